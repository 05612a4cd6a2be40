"""What every stage process does to start, log, stop and fail.

A stage runs with the configuration `pipeline up` validated and left in the run directory when it still describes
the file (no pydantic in the stage), else with the file validated here. The first SIGTERM/SIGINT asks the stage to
finish what it holds, a second one kills it. A fatal error leaves its reason in the run directory for `pipeline up`.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import errors, logs
from pipeline.config import overrides, snapshot
from pipeline.config.schema.behaviour import pooled_model
from pipeline.errors import PipelineError
from pipeline.supervision import run_dir as rundir
from pipeline.wire.endpoints import Endpoints

if TYPE_CHECKING:  # pipeline.config.load loads pydantic: only the commands that validate a file import it
    from pipeline.config.load import Config

log = logging.getLogger("pipeline")

Body = Callable[["Config", Path], "int | None"]
Resolved = tuple[Path, str]  # a model's folder and version (pipeline.stages.worker.stage.resolve)


@dataclass(frozen=True)
class Prepared:
    """What a forked worker takes from the fork server instead of finding it itself: its config, the checked run
    directory, its model's folder and version, and the stack's endpoints."""

    cfg: Config
    run_dir: Path
    model: Resolved
    endpoints: Endpoints


def stop_event() -> threading.Event:
    """First SIGTERM/SIGINT sets the event (the stage finishes what it holds); a second one kills."""
    stop = threading.Event()

    def handle(sig: int, _frame: object) -> None:
        stop.set()
        signal.signal(sig, signal.SIG_DFL)

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    return stop


def run_dir_of(cfg: Config, args: argparse.Namespace) -> Path:
    """`--run-dir`, else the configuration's default run directory; checked and created private."""
    return rundir.prepare(rundir.chosen(args.run_dir, cfg))


def run_stage(name: str, args: argparse.Namespace, body: Body, given: Prepared | None = None) -> int:
    """Common life of a stage process: config and run dir (those `given`, else found here), logs, run; fatal errors
    leave a reason for `pipeline up`."""
    logs.setup(name, getattr(args, "rule", None), args.log_level)
    run_dir = given.run_dir if given else Path(args.run_dir).resolve() if args.run_dir else None
    try:
        cfg, run_dir = (given.cfg, given.run_dir) if given else _configured(args, run_dir)
        return body(cfg, run_dir) or errors.OK
    except PipelineError as e:
        log.error("%s", e)
        program = rundir.worker_program(args.rule) if name == "worker" else name
        if run_dir is not None and e.exit_code in errors.FATAL_EXIT_CODES:
            leave_reason(run_dir, program, e)
        return e.exit_code


def _configured(args: argparse.Namespace, run_dir: Path | None) -> tuple[Config, Path]:
    cfg = stage_config(args, rundir.prepare(run_dir) if run_dir else None)
    return cfg, run_dir_of(cfg, args)


def leave_reason(run_dir: Path, program: str, e: PipelineError) -> None:
    """The fatal reason file of `program` for `pipeline up`; an unsafe run dir gets nothing written in it."""
    try:
        rundir.prepare(run_dir)
        rundir.leave_fatal(run_dir, program, e.exit_code, str(e))
    except (PipelineError, OSError) as why:
        log.error("could not leave the reason in %s: %s", run_dir, why)


def stage_config(args: argparse.Namespace, run_dir: Path | None) -> Config:
    """The configuration a stage runs with: the one `pipeline up` validated and left in the run dir when it still
    describes the file (no pydantic in this process), else the file validated here."""
    cfg = snapshot.read(run_dir, args.config) if run_dir else None
    if cfg is None:
        from pipeline.config import load

        cfg = load.load(args.config)
    return cfg.with_workers(overrides.workers(args.workers, cfg))


def ingress(args: argparse.Namespace) -> int:
    """`pipeline ingress`: MQTT subscriptions of every rule -> each rule's workers."""
    from pipeline.stages import ingress

    return run_stage("ingress", args, lambda cfg, rd: ingress.run(cfg, Endpoints.for_config(cfg, rd), stop_event()))


def egress(args: argparse.Namespace) -> int:
    """`pipeline egress`: results of every worker -> MQTT."""
    from pipeline.stages import egress

    return run_stage("egress", args, lambda cfg, rd: egress.run(cfg, Endpoints.for_config(cfg, rd), stop_event()))


def worker(args: argparse.Namespace) -> int:
    """`pipeline worker --rule RULE`: one worker process of a rule, of this stack or (--connect) of another box's."""
    return run_stage("worker", args, worker_body(args, None))


def worker_body(args: argparse.Namespace, stop: threading.Event | None, given: Prepared | None = None) -> Body:
    """What a worker of `args.rule` runs once its config is known: load the model (from the folder `given`, if),
    connect, serve until `stop` (None: the first SIGTERM/SIGINT, from the moment the model is loaded)."""
    from pipeline.stages.worker.stage import load_pool, run_lanes

    def body(cfg: Config, rd: Path) -> int:
        rules = served_rules(cfg, args.rule)
        eps = given.endpoints if given else worker_endpoints(cfg, rd, args)
        until = stop or stop_event()
        procs = load_pool(cfg, rules, given.model if given else None)
        pool = args.rule if pooled_model(args.rule) else None
        return run_lanes(cfg, eps, until, procs, pool)

    return body


def served_rules(cfg: Config, unit: str) -> list[Any]:
    """The rules a worker of `unit` serves: the rule of that name, or the shared rules of the model whose pool `unit`
    names (`<model>~pool`); ConfigError when there is no such rule or pool."""
    model = pooled_model(unit)
    if model is not None:
        rules = cfg.pools().get(model)
        if not rules:
            raise errors.ConfigError(cfg.source, [f"no rule of model '{model}' has workers: shared (pool {unit})"])
        return rules
    try:
        return [cfg.rule(unit)]
    except KeyError as e:
        raise errors.ConfigError(cfg.source, [str(e.args[0])]) from None


def worker_endpoints(cfg: Config, rd: Path, args: argparse.Namespace) -> Endpoints:
    """The stack's own endpoints, or with --connect those a stack on another box opens to remote workers."""
    if not args.connect:
        return Endpoints.for_config(cfg, rd)
    missing = [flag for flag, v in (("--key", args.key), ("--server-key", args.server_key)) if not v]
    if missing:
        raise errors.ConfigError("--connect", [f"a remote worker needs {' and '.join(missing)} (see `pipeline keys`)"])
    return Endpoints.remote_worker(cfg, rd, args.connect, Path(args.key), Path(args.server_key))


def control(args: argparse.Namespace) -> int:
    """`pipeline control`: the control API under gunicorn."""
    from pipeline.control.server import ControlServer

    return run_stage("control", args, lambda cfg, rd: ControlServer(cfg, rd, args.log_level or "info").run())
