"""Running a stack: start supervisord, watch it, stop it.

Signal handlers only record the signal; one loop handles it (gunicorn's arbiter style). The stack runs in
its own session so a terminal's Ctrl-C reaches `pipeline up` alone, which then stops supervisord, which
stops the stages in reverse priority (ingress first, so intake stops before the consumers go).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pipeline import errors
from pipeline.commands.broker import port_in_use
from pipeline.commands.models import prefetch
from pipeline.config import snapshot
from pipeline.config.load import Config
from pipeline.errors import StartupError
from pipeline.supervision import programs, reload
from pipeline.supervision import run_dir as rundir
from pipeline.supervision.rpc import Supervisor
from pipeline.wire.endpoints import Endpoints

log = logging.getLogger("pipeline.up")


def preflight(cfg: Config, run_dir: Path) -> None:
    """Refuse to start for reasons a restart would not fix, with a message that says what to do."""
    for name, b in cfg.brokers.items():
        if b.embedded and port_in_use(b.host, b.port):
            raise StartupError(
                f"brokers.{name}: the embedded broker cannot listen on {b.host}:{b.port}: something already "
                f"listens there (a broker?). To use it, set brokers.{name}.url: mqtt://{b.host}:{b.port} in "
                f"{cfg.source} (for conf/example.yaml: PIPELINE_BROKER_URL=mqtt://{b.host}:{b.port})."
            )
    host, port = cfg.control.listen.rsplit(":", 1)
    if port_in_use(host, int(port)):
        raise StartupError(f"control.listen: {cfg.control.listen} is already in use (another stack?) in {cfg.source}")
    Endpoints.for_config(cfg, run_dir)  # the remote workers' key files, read now rather than by each stage
    if (run_dir / rundir.SUPERVISOR_SOCKET).exists() and Supervisor(run_dir).alive():
        raise StartupError(f"a stack already runs (or is still stopping) with run directory {run_dir}: "
                           "stop it and wait, or pass another --run-dir")


def _copy(pipe: Any) -> None:
    out = sys.stdout.buffer
    for line in iter(pipe.readline, b""):
        out.write(line)
        out.flush()


class Stack:
    """`pipeline up` for one configuration: owns the supervisord process, the run directory's files and the
    signal handling. Runs until a signal or a stage that stopped for good, and always stops supervisord."""

    def __init__(self, cfg: Config, run_dir: Path, log_level: str, log_dir: Path | None = None) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self.log_level = log_level
        self.log_dir = log_dir
        self.signals: list[int] = []
        # ingress drains for up to the longest timeout (+2 s); everything else stops within a few seconds
        self.stop_timeout = max(r.timeout for r in cfg.rules) + 12.0
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        preflight(self.cfg, self.run_dir)
        rundir.clear_fatal(self.run_dir)
        if self.log_dir:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        conf = self.run_dir / rundir.SUPERVISORD_CONF
        progs = programs.programs(self.cfg, self.run_dir, self.log_level, self.hand_over())
        rundir.write_private(conf, programs.render(progs, self.run_dir, self.log_dir))
        # children log to supervisord's stdout: a pipe we copy to ours (reopening a redirected /dev/stdout
        # would write from offset 0 over what is there)
        self.proc = subprocess.Popen([sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(conf)],
                                     start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.copier = threading.Thread(target=_copy, args=(self.proc.stdout,), daemon=True, name="logs")
        self.copier.start()
        log.info("stack %s starting (run dir %s, control on %s://%s)", self.cfg.instance, self.run_dir,
                 "https" if self.cfg.control.tls is not None else "http", self.cfg.control.listen)

    def hand_over(self) -> tuple[str, ...]:
        """Write the validated config for the stages and put its run id and secrets in the environment
        supervisord passes on; return the variables the processes without a use for secrets go without."""
        run = secrets.token_hex(16)
        values = snapshot.write(self.run_dir, self.cfg, run)
        if values is None:  # the stages validate the file themselves, each from the whole environment
            log.debug("no %s in %s: the stages validate %s themselves", snapshot.FILE, self.run_dir, self.cfg.source)
            os.environ.pop(snapshot.RUN, None)
            os.environ.pop(snapshot.SECRETS, None)
            return ()
        os.environ[snapshot.RUN] = run
        os.environ[snapshot.SECRETS] = json.dumps(values)
        return (snapshot.SECRETS, *snapshot.withheld_variables(self.cfg.source))

    def run(self) -> int:
        """Spawn, then watch until a signal or a fatal stage; return the exit code."""
        self.hups: list[int] = []  # SIGHUP: reload the models whose version changed (pipeline.supervision.reload)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda s, _f: self.signals.append(s))
        signal.signal(signal.SIGHUP, lambda s, _f: self.hups.append(s))
        prefetch(self.cfg)  # every model once, before N workers would download it in parallel
        self.spawn()
        rpc, announced = Supervisor(self.run_dir), False
        while not self.signals:
            time.sleep(0.25)
            if self.proc is not None and self.proc.poll() is not None:
                log.error("supervisord exited with %s", self.proc.returncode)
                return 1
            if self.hups:
                self.hups.clear()
                reload.on_sighup(self.cfg, self.run_dir)
            procs = rpc.processes()
            code = self.fatal(procs)
            if code:
                self.stop()
                return code
            if not announced and procs and all(p["statename"] == "RUNNING" for p in procs):
                announced = True
                log.info("all %d processes running; Ctrl-C stops the stack", len(procs))
        self.stop()
        return errors.OK

    def fatal(self, procs: list[dict[str, Any]]) -> int:
        """Exit code of a stage that stopped for good (reported), else 0.

        supervisord forgets the exit status of a process that died within `startsecs` (BACKOFF), so stages
        leave a reason file in the run directory (`run_dir.fatal_file`) before a fatal exit.
        """
        for p in procs:
            if p["statename"] not in ("EXITED", "FATAL", "BACKOFF"):
                continue
            code, reason = self._left_reason(p["group"])
            if not code and p["statename"] != "FATAL":
                continue
            code = code or 1
            reason = reason or p.get("spawnerr") or f"exit status {p['exitstatus']}"
            name = errors.EXIT_CODE_NAMES.get(code, "FATAL")
            log.error("%s stopped for good (%s): %s", p["name"], name, reason)
            print(f"pipeline: {p['name']} failed ({name}): {reason}", file=sys.stderr)
            return code
        return 0

    def _left_reason(self, program: str) -> tuple[int, str]:
        f = rundir.fatal_file(self.run_dir, program)
        if not f.exists():
            return 0, ""
        return rundir.read_fatal(f)

    def stop(self) -> None:
        """Stop supervisord (it stops every stage); kill the whole session if it takes too long."""
        if self.proc is None or self.proc.poll() is not None:
            return
        log.info("stopping the stack")
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            log.error("supervisord did not stop within %gs: killing its process group", self.stop_timeout)
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.copier.join(2)
