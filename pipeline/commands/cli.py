"""The `pipeline` command line: the parser and the commands that validate or run a stack (`up`, `check`).

Stage subcommands (ingress, egress, forkserver, worker, control) hand over to `pipeline.stages.boot`; a stage process
parses only their part of the command line, so the tools' modules (bench, status, models, keys...) never load in it."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from argparse import ArgumentParser
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import __version__, errors, logs
from pipeline.config import overrides
from pipeline.errors import PipelineError
from pipeline.stages import boot

if TYPE_CHECKING:  # pipeline.config.load loads pydantic: only the commands that validate a file import it
    from pipeline.config.load import Broker, Config, Rule

def cmd_broker(args: argparse.Namespace) -> int:
    """`pipeline broker`: the embedded MQTT broker, until SIGTERM."""
    from pipeline.commands import broker

    logs.setup("broker", None, args.log_level)
    host, port = args.listen.rsplit(":", 1)
    broker.run(host, int(port), boot.stop_event())
    return errors.OK


def cmd_check(args: argparse.Namespace) -> int:
    """`pipeline check`: validate the file, print its summary; with --fetch, download and verify every model."""
    from pipeline.commands import models
    from pipeline.config import load as config

    try:
        loaded = config.load_file(args.config)
    except errors.ConfigError as e:
        print(e, file=sys.stderr)
        return e.exit_code
    cfg = loaded.config
    print(summary(cfg))
    notes = models.notes(loaded)
    if notes:
        print("\n".join(notes))
    if args.fetch:  # download and verify every model too (offline without it)
        return models.fetch(cfg)
    return errors.OK


def _workers(cfg: Config, rule: Rule) -> str:
    """How a rule's workers read in `pipeline check`: its own count, and the model's pool when it is shared."""
    pool = f"shared (pool of {cfg.models[rule.model].pool})" if rule.shared else ""
    return " + ".join(filter(None, [f"x{rule.workers}" if rule.workers or not rule.shared else "", pool]))


def _protocol(b: Broker) -> str:
    """The MQTT version a broker's links will speak, as `check` tells it."""
    if b.protocol != "auto":
        return f"MQTT {b.protocol}"
    return "MQTT 3.1.1: the embedded broker" if b.embedded else "MQTT 5, or 3.1.1 if the broker refuses 5"


def _trial(live: Rule) -> dict[str, str]:
    """What `check` says of the companions of a rule's shadow and canary."""
    shown = "each of its messages" if live.shadow is None or live.shadow.percent >= 100 else \
        f"{live.shadow.percent:g}% of its messages"
    said = {"shadow": f"shadow of {live.name}: a QoS 0 copy of {shown}, never its topic"}
    c = live.canary
    if c is not None:
        p99 = f", max_p99 {c.max_p99 * 1000:g}ms" if c.max_p99 is not None else ""
        said["canary"] = (f"canary of {live.name}: {c.percent:g}% of the keys ({' '.join(c.key or ['the topic'])}); "
                          f"rolled back past max_error_rate {c.max_error_rate:.2%}{p99} over {c.window:g}s, "
                          f"else then: {c.then}")
    return said


def summary(cfg: Config) -> str:
    """One screen: brokers, models, rules, and a warning when control is exposed. Never shows a password."""
    out = [f"{cfg.source}: OK (stack '{cfg.instance}', control on {cfg.control.listen})", "brokers:"]
    for n, b in cfg.brokers.items():
        auth = f" as {b.username}" if b.username else ""
        out.append(f"  {n:<16} {b.url}{auth} ({_protocol(b)})")
    out.append("models:")
    out += [f"  {n:<16} {m.where}  params={m.params}" for n, m in cfg.models.items()]
    out.append("rules:")
    for r in cfg.rules:
        out.append(f"  {r.name:<16} {r.sub.broker}:{r.sub.topic} (qos {r.sub.qos}) -> {r.model} {_workers(cfg, r)} "
                   f"-> {r.pub.broker}:{r.pub.topic} (qos {r.pub.qos}{', retain' if r.pub.retain else ''}); "
                   f"errors -> {r.error_topic}; timeout {r.timeout:g}s")
        if r.trial is not None:
            out.append(f"  {'':<16} {_trial(cfg.rule(r.trial_of))[r.trial]}")
    from pipeline.control.hosts import exposure

    out += [f"warning: {line}" for line in exposure(cfg.control)]
    return "\n".join(out)


def cmd_up(args: argparse.Namespace) -> int:
    """`pipeline up`: validate the file, then run the whole stack under supervisord in the foreground."""
    from pipeline.commands import models
    from pipeline.config import load as config
    from pipeline.supervision.runner import Stack

    logs.setup("up", None, args.log_level)
    try:
        loaded = config.load_file(args.config)
        for line in models.notes(loaded):
            logging.getLogger("pipeline.up").warning("%s: %s", args.config, line)
        cfg = loaded.config
        cfg = cfg.with_workers(overrides.workers(args.workers, cfg))
        log_dir = Path(args.log_dir).resolve() if args.log_dir else None
        return Stack(cfg, boot.run_dir_of(cfg, args), args.log_level or "info", log_dir).run()
    except PipelineError as e:
        print(f"pipeline: {e}", file=sys.stderr)
        return e.exit_code


def cmd_forkserver(args: argparse.Namespace) -> int:
    """`pipeline forkserver`: the stage that forks every local worker (pipeline.stages.forkserver)."""
    from pipeline.stages import forkserver

    return forkserver.main(args)


STAGES = ("ingress", "egress", "control", "forkserver", "worker")  # what supervisord starts; `pipeline worker` too


def parser(stages_only: bool = False) -> ArgumentParser:
    """The whole command line; with `stages_only`, the subcommands that run a stage and not the tools (bench,
    status, deploy, models, keys), whose modules and parsers would cost every stage process memory."""
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
    add("ingress", boot.ingress, "run the ingress stage (MQTT -> workers)")
    add("egress", boot.egress, "run the egress stage (workers -> MQTT)")
    add("control", boot.control, "run the control API (gunicorn)")
    add("forkserver", cmd_forkserver, "run every local worker of the stack, forked from one process")
    w = add("worker", boot.worker, "run one worker of a rule")
    w.add_argument("--rule", required=True)
    w.add_argument("--connect", metavar="HOST[:PORT]", help="join the stack on HOST (endpoints.remote; port: its "
                   "base_port, default from the config or 5900) as a remote worker")
    w.add_argument("--key", help="with --connect: this worker's secret key file (NAME.key_secret)")
    w.add_argument("--server-key", help="with --connect: the stack's public key file (NAME.key)")
    add("broker", cmd_broker, "run the embedded MQTT broker (amqtt)", stage=False).add_argument(
        "--listen", default="127.0.0.1:1883", help="HOST:PORT")
    if stages_only:
        return p
    from pipeline.commands import bench, models, rollout, status, supervisord_conf
    from pipeline.wire import curve

    bench.add_commands(sub)  # loadgen, bench: their modules load when run
    status.add_commands(sub)  # status: rich loads only when it runs
    supervisord_conf.add_commands(sub)
    models.add_commands(sub)  # convert, models fetch
    rollout.add_commands(sub)  # record, replay
    curve.add_commands(sub)  # keys
    return p


PRIVATE_UMASK = 0o077  # what the stack writes (outbox, model cache, run dir, logs) is its user's alone


def main(argv: list[str] | None = None) -> int:
    """Run the `pipeline` command with `argv` (default: the process's arguments); return its exit code."""
    argv = sys.argv[1:] if argv is None else argv
    os.umask(PRIVATE_UMASK)  # inherited by supervisord and every stage it starts
    args = parser(stages_only=bool(argv) and argv[0] in STAGES).parse_args(argv)
    return args.func(args)
