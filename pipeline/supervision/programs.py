"""`pipeline up`: render a supervisord configuration for a stack and run supervisord in the foreground.

supervisord restarts any stage that crashes. A stage that exits with one of FATAL_EXIT_CODES (bad config,
model that will not import, port taken) is not restarted; `pipeline up` notices it through supervisord's
XML-RPC interface, prints the reason the stage left in the run directory, stops the stack and exits with
that code.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import errors
from pipeline.supervision import run_dir as rundir

if TYPE_CHECKING:  # pipeline.config.load loads pydantic; a stage gets its config from pipeline.config.snapshot
    from pipeline.config.load import Config

STOP_WAIT = 4  # seconds supervisord waits for a stage to stop before SIGKILL (ingress, fork server: + timeout)


@dataclass(frozen=True)
class Program:
    """One supervisord program of the stack: its `pipeline` arguments, priority, process count and stop wait."""

    name: str
    args: list[str]
    priority: int  # supervisord starts low first and stops high first: producers stop before consumers
    numprocs: int = 1
    env: dict[str, str] = field(default_factory=dict)
    stop_wait: int = STOP_WAIT
    retries: int = 3  # quick failures in a row before supervisord gives up (FATAL)
    start_secs: int = 1  # a process must stay up this long to count as started
    autostart: bool = True
    withheld: tuple[str, ...] = ()  # environment variables the process is started without


def programs(cfg: Config, run_dir: Path, log_level: str, withheld: tuple[str, ...] = ()) -> list[Program]:
    """Every program of the stack, in start order; worker counts as in `cfg` (overrides applied). The fork server
    (the workers) and the embedded brokers, which need no secret, are started without the variables in `withheld`."""
    common = ["-c", str(cfg.source), "--run-dir", str(run_dir), "--log-level", log_level]
    drain = int(max(r.timeout for r in cfg.rules)) + STOP_WAIT  # ingress waits for in-flight work
    for rule in cfg.rules:
        common += ["--workers", f"{rule.name}={rule.workers}"]
    progs = [Program(f"broker-{n}", ["broker", "--listen", f"{b.host}:{b.port}"], 10, withheld=withheld)
             for n, b in cfg.brokers.items() if b.embedded]
    progs += [Program("egress", ["egress", *common], 20, stop_wait=STOP_WAIT + 5),
              Program("control", ["control", *common], 30)]
    # every local worker is forked by one fork server (spares too, for hot reloads: it runs even when every rule
    # has workers: 0). startsecs=0: it exits only on a stop or a worker that cannot start (a fatal code)
    env = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    stop_wait = int(max(r.timeout for r in cfg.rules)) + STOP_WAIT + 3  # the fork server's own wait, then SIGKILL
    progs.append(Program(rundir.FORKSERVER_PROGRAM, ["forkserver", *common], 40, 1, env, stop_wait=stop_wait,
                         start_secs=0, withheld=withheld))
    progs.append(Program("ingress", ["ingress", *common], 50, stop_wait=drain))
    return progs


def _esc(s: str) -> str:
    return s.replace("%", "%%")  # supervisord expands %(name)s in values


def _without(names: tuple[str, ...]) -> list[str]:
    """The prefix that starts a command without these environment variables (supervisord can only add some)."""
    if not names:
        return []
    return [shutil.which("env") or "/usr/bin/env", *(arg for n in names for arg in ("-u", n))]


def render(progs: list[Program], run_dir: Path, log_dir: Path | None) -> str:
    """The supervisord.conf text."""
    lines = [
        "[supervisord]", "nodaemon=true", f"logfile={_esc(str(run_dir / rundir.SUPERVISORD_LOG))}",
        "logfile_maxbytes=5MB", "logfile_backups=2", f"pidfile={_esc(str(run_dir / rundir.SUPERVISORD_PID))}",
        f"childlogdir={_esc(str(run_dir))}", "",
        "[unix_http_server]", f"file={_esc(str(run_dir / rundir.SUPERVISOR_SOCKET))}", "chmod=0700", "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface", "",
        "[supervisorctl]", f"serverurl=unix://{_esc(str(run_dir / rundir.SUPERVISOR_SOCKET))}", "",
    ]
    fatal = ",".join(str(c) for c in (errors.OK, *errors.FATAL_EXIT_CODES))
    for p in progs:
        env = {"PYTHONUNBUFFERED": "1", **p.env}
        if log_dir is None:
            out = ["stdout_logfile=/dev/stdout", "stdout_logfile_maxbytes=0"]
        else:
            out = [f"stdout_logfile={_esc(str(log_dir))}/%(program_name)s-%(process_num)d.log",
                   "stdout_logfile_maxbytes=10MB", "stdout_logfile_backups=3"]
        lines += [
            f"[program:{p.name}]",
            f"command={_esc(shlex.join([*_without(p.withheld), sys.executable, '-m', 'pipeline', *p.args]))}",
            "process_name=%(program_name)s-%(process_num)d", f"numprocs={p.numprocs}",
            f"priority={p.priority}", f"autostart={str(p.autostart).lower()}", "autorestart=unexpected",
            f"exitcodes={fatal}", f"startsecs={p.start_secs}", f"startretries={p.retries}", "stopsignal=TERM",
            f"stopwaitsecs={p.stop_wait}",
            "stopasgroup=true", "killasgroup=true", "redirect_stderr=true", *out,
            "environment=" + ",".join(f'{k}="{_esc(v)}"' for k, v in env.items()), "",
        ]
    return "\n".join(lines)
