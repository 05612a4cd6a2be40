"""The `pipeline` command. The only module that imports the stages."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from argparse import ArgumentParser
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import __version__, errors, frozen, logs, rundir
from pipeline.endpoints import Endpoints
from pipeline.errors import PipelineError

if TYPE_CHECKING:  # pipeline.config loads pydantic: only the commands that validate a file import it
    from pipeline.config import Config

log = logging.getLogger("pipeline")


def _stop_event() -> threading.Event:
    """First SIGTERM/SIGINT sets the event (the stage finishes what it holds); a second one kills."""
    stop = threading.Event()

    def handle(sig: int, _frame: object) -> None:
        stop.set()
        signal.signal(sig, signal.SIG_DFL)

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    return stop


def _run_dir(cfg: Config, args: argparse.Namespace) -> Path:
    return rundir.prepare(Path(args.run_dir).resolve() if args.run_dir else cfg.default_run_dir())


def _stage(name: str, args: argparse.Namespace, body: Callable[[Config, Path], int | None]) -> int:
    """Common life of a stage process: config, logs, run; fatal errors leave a reason for `pipeline up`."""
    logs.setup(name if name != "worker" else "worker", getattr(args, "rule", None), args.log_level)
    run_dir = Path(args.run_dir).resolve() if args.run_dir else None
    try:
        cfg = _stage_config(args, rundir.prepare(run_dir) if run_dir else None)
        run_dir = _run_dir(cfg, args)
        return body(cfg, run_dir) or errors.OK
    except PipelineError as e:
        log.error("%s", e)
        program = f"rule-{args.rule}" if name == "worker" else name
        if run_dir is not None and e.exit_code in errors.FATAL_EXIT_CODES:
            _leave_reason(run_dir, program, e)
        return e.exit_code


def _leave_reason(run_dir: Path, program: str, e: PipelineError) -> None:
    """`<run dir>/fatal/<program>.txt` for `pipeline up`; an unsafe run dir gets nothing written in it."""
    try:
        rundir.prepare(run_dir)
        rundir.write_private(rundir.private_folder(run_dir / "fatal") / f"{program}.txt", f"{e.exit_code}\n{e}")
    except (PipelineError, OSError) as why:
        log.error("could not leave the reason in %s: %s", run_dir, why)


def _stage_config(args: argparse.Namespace, run_dir: Path | None) -> Config:
    """The configuration a stage runs with: the one `pipeline up` validated and left in the run dir when it still
    describes the file (no pydantic in this process), else the file validated here."""
    cfg = frozen.read(run_dir, args.config) if run_dir else None
    if cfg is None:
        from pipeline import config

        cfg = config.load(args.config)
    return cfg.with_workers(_workers(args.workers, cfg))


def cmd_ingress(args: argparse.Namespace) -> int:
    from pipeline import ingress

    return _stage("ingress", args, lambda cfg, rd: ingress.run(cfg, Endpoints.for_config(cfg, rd), _stop_event()))


def cmd_egress(args: argparse.Namespace) -> int:
    from pipeline import egress

    return _stage("egress", args, lambda cfg, rd: egress.run(cfg, Endpoints.for_config(cfg, rd), _stop_event()))


def cmd_worker(args: argparse.Namespace) -> int:
    from pipeline import workers
    from pipeline.workers.stage import load

    def body(cfg: Config, rd: Path) -> int:
        try:
            cfg.rule(args.rule)
        except KeyError as e:
            raise errors.ConfigError(cfg.source, [str(e.args[0])]) from None
        eps = _worker_endpoints(cfg, rd, args)
        stop = _stop_event()
        proc = load(cfg, args.rule)
        return workers.run(cfg, args.rule, eps, stop, proc)

    return _stage("worker", args, body)


def _worker_endpoints(cfg: Config, rd: Path, args: argparse.Namespace) -> Endpoints:
    """The stack's own endpoints, or with --connect those a stack on another box opens to remote workers."""
    if not args.connect:
        return Endpoints.for_config(cfg, rd)
    missing = [flag for flag, v in (("--key", args.key), ("--server-key", args.server_key)) if not v]
    if missing:
        raise errors.ConfigError("--connect", [f"a remote worker needs {' and '.join(missing)} (see `pipeline keys`)"])
    return Endpoints.remote_worker(cfg, rd, args.connect, Path(args.key), Path(args.server_key))


def cmd_control(args: argparse.Namespace) -> int:
    from pipeline.control.server import ControlServer

    return _stage("control", args, lambda cfg, rd: ControlServer(cfg, rd, args.log_level or "info").run())


def cmd_broker(args: argparse.Namespace) -> int:
    from pipeline import broker

    logs.setup("broker", None, args.log_level)
    host, port = args.listen.rsplit(":", 1)
    broker.run(host, int(port), _stop_event())
    return errors.OK


def cmd_check(args: argparse.Namespace) -> int:
    from pipeline import config

    try:
        loaded = config.load_file(args.config)
    except errors.ConfigError as e:
        print(e, file=sys.stderr)
        return e.exit_code
    cfg = loaded.config
    print(summary(cfg))
    notes = __import__("pipeline.models_cli").models_cli.notes(loaded)
    if notes:
        print("\n".join(notes))
    if args.fetch:  # download and verify every model too (offline without it)
        return __import__("pipeline.models_cli").models_cli.fetch(cfg)
    return errors.OK


def summary(cfg: Config) -> str:
    """One screen: brokers, models, rules, and a warning when control is exposed. Never shows a password."""
    out = [f"{cfg.source}: OK (stack '{cfg.instance}', control on {cfg.control.listen})", "brokers:"]
    for n, b in cfg.brokers.items():
        auth = f" as {b.username}" if b.username else ""
        out.append(f"  {n:<16} {b.url}{auth}")
    out.append("models:")
    out += [f"  {n:<16} {m.where}  params={m.params}" for n, m in cfg.models.items()]
    out.append("rules:")
    for r in cfg.rules:
        out.append(f"  {r.name:<16} {r.sub.broker}:{r.sub.topic} (qos {r.sub.qos}) -> {r.model} x{r.workers} "
                   f"-> {r.pub.broker}:{r.pub.topic} (qos {r.pub.qos}{', retain' if r.pub.retain else ''}); "
                   f"errors -> {r.error_topic}; timeout {r.timeout:g}s")
    from pipeline.control.hosts import exposure

    out += [f"warning: {line}" for line in exposure(cfg.control)]
    return "\n".join(out)


def _workers(items: list[str], cfg: Config) -> dict[str, int]:
    out = {}
    for item in items:
        name, _, n = item.partition("=")
        if not n.isdigit() or int(n) > 64:  # 0: no local worker (the rule's workers are remote)
            raise errors.ConfigError("--workers", [f"expected RULE=N with 0 <= N <= 64 (got {item!r})"])
        try:
            cfg.rule(name)
        except KeyError as e:
            raise errors.ConfigError("--workers", [str(e.args[0])]) from None
        out[name] = int(n)
    return out


def cmd_up(args: argparse.Namespace) -> int:
    from pipeline import config
    from pipeline.up import Stack

    logs.setup("up", None, args.log_level)
    try:
        loaded = config.load_file(args.config)
        for line in __import__("pipeline.models_cli").models_cli.notes(loaded):
            logging.getLogger("pipeline.up").warning("%s: %s", args.config, line)
        cfg = loaded.config
        cfg = cfg.with_workers(_workers(args.workers, cfg))
        log_dir = Path(args.log_dir).resolve() if args.log_dir else None
        return Stack(cfg, _run_dir(cfg, args), args.log_level or "info", log_dir).run()
    except PipelineError as e:
        print(f"pipeline: {e}", file=sys.stderr)
        return e.exit_code


STAGES = ("ingress", "egress", "control", "worker")  # what supervisord starts; `pipeline worker` on other boxes too


def parser(stages_only: bool = False) -> ArgumentParser:
    """The whole command line; with `stages_only`, the subcommands that run a stage and not the tools (bench,
    status, deploy, models, keys), whose modules and parsers would cost every stage process ~2 MiB of RSS."""
    p = argparse.ArgumentParser(prog="pipeline", description="Edge model runtime: MQTT -> Python models -> MQTT.")
    p.add_argument("--version", action="version", version=f"pipeline {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], int], text: str, stage: bool = True) -> ArgumentParser:
        sp = sub.add_parser(name, help=text, description=text)
        sp.set_defaults(func=func)
        sp.add_argument("--log-level", help="DEBUG, INFO, WARNING... (default: $PIPELINE_LOG_LEVEL or INFO)")
        if stage:
            sp.add_argument("-c", "--config", required=True, help="the YAML configuration file")
            sp.add_argument("--run-dir", help="sockets and supervisord files (default $XDG_RUNTIME_DIR/pipeline-NAME,\n"
                            "else /tmp/pipeline-UID/NAME)")
            sp.add_argument("--workers", action="append", default=[], metavar="RULE=N", help="override workers of RULE")
        return sp

    up = add("up", cmd_up, "run the whole stack under supervisord, in the foreground")
    up.add_argument("--log-dir", help="write each process's log to rotated files here instead of stdout")
    add("check", cmd_check, "validate a configuration file and print a summary").add_argument(
        "--fetch", action="store_true", help="also download and verify every model (exit 3 naming a failure)")
    add("ingress", cmd_ingress, "run the ingress stage (MQTT -> workers)")
    add("egress", cmd_egress, "run the egress stage (workers -> MQTT)")
    add("control", cmd_control, "run the control API (gunicorn)")
    w = add("worker", cmd_worker, "run one worker of a rule")
    w.add_argument("--rule", required=True)
    w.add_argument("--connect", metavar="HOST[:PORT]", help="join the stack on HOST (endpoints.remote; port: its "
                   "base_port, default from the config or 5900) as a remote worker")
    w.add_argument("--key", help="with --connect: this worker's secret key file (NAME.key_secret)")
    w.add_argument("--server-key", help="with --connect: the stack's public key file (NAME.key)")
    add("broker", cmd_broker, "run the embedded MQTT broker (amqtt)", stage=False).add_argument(
        "--listen", default="127.0.0.1:1883", help="HOST:PORT")
    if stages_only:
        return p
    __import__("pipeline.bench").bench.add_commands(sub)  # loadgen, bench: their modules load when run
    __import__("pipeline.status").status.add_commands(sub)  # status: rich loads only when it runs
    __import__("pipeline.deploy").deploy.add_commands(sub)  # supervisord-conf
    __import__("pipeline.models_cli").models_cli.add_commands(sub)  # convert, models fetch
    __import__("pipeline.curve").curve.add_commands(sub)  # keys
    return p


PRIVATE_UMASK = 0o077  # what the stack writes (outbox, model cache, run dir, logs) is its user's alone


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    os.umask(PRIVATE_UMASK)  # inherited by supervisord and every stage it starts
    args = parser(stages_only=bool(argv) and argv[0] in STAGES).parse_args(argv)
    return args.func(args)
