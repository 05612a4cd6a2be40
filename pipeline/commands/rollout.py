"""`pipeline record` and `pipeline replay`: take what a rule receives into a capture file, and run a capture
through one or two model versions, printing what their outputs differ in.

`record` asks a running stack's ingress to tap the rule through the control API (the default: it records exactly
what the rule received, after routing, and adds no client to the broker), or with `--from-broker` subscribes to
the rule's filter itself. `replay` is `pipeline.rollout.replay` and `pipeline.rollout.diff`. Exit codes: 0, 1 (the
difference passes --max-diff; a recording that could not be made), 2 (a bad capture file, config or argument),
3 (a model that does not load). Only the standard library and orjson load with the parser; the rest when a
command runs.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from pipeline import errors
from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from pipeline.config.load import Config, Rule
    from pipeline.rollout.replay import Version


INTERRUPTED = 130  # the shell's code for a command stopped by Ctrl-C


class Refused(PipelineError):
    """A recording the stack or the broker would not give; the message says why (exit 1). `status`: the control
    API's HTTP status, 0 when it did not answer."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def add_commands(sub: Any) -> None:
    """Register `record` and `replay` on the `pipeline` command's subparsers."""
    text = "record the messages a rule receives into a capture file (from a running stack, or the broker)"
    rec = sub.add_parser("record", help=text, description=text)
    rec.add_argument("-c", "--config", required=True, help="the YAML configuration file")
    rec.add_argument("--rule", required=True, help="the rule whose input is recorded")
    rec.add_argument("--duration", help="how long to record (10s, 10m, 1h; default 10m)")
    rec.add_argument("-n", "--count", type=int, help="stop after this many messages (default 100000)")
    rec.add_argument("--max-bytes", type=int, help="stop before the capture passes this size (default 64 MiB)")
    rec.add_argument("--out", required=True, help="the capture file to write")
    rec.add_argument("--from-broker", action="store_true",
                     help="subscribe to the rule's filter instead of tapping a running stack's ingress")
    rec.set_defaults(func=cmd_record)
    text = "replay a capture through a model version (and another to compare with) and print the difference"
    rep = sub.add_parser("replay", help=text, description=text)
    rep.add_argument("capture", help="a capture file (pipeline record)")
    rep.add_argument("--model", required=True, help="NEW: a model folder or archive, or a model name of -c FILE")
    rep.add_argument("--against", help="CURRENT: compared with NEW (a folder, an archive or a model name)")
    rep.add_argument("--speed", default="max", help="max (as fast as the workers go, the default) or Nx: the "
                     "capture's own pace sped up N times")
    rep.add_argument("-c", "--config", help="the configuration: the rule's settings and the models' params")
    rep.add_argument("--json", action="store_true", help="print a machine-readable report")
    rep.add_argument("--max-diff", default="0", help="N messages or P%% that may differ (default 0); over it: exit 1")
    rep.set_defaults(func=cmd_replay)


def cmd_record(args: argparse.Namespace) -> int:
    from pipeline.rollout import taps

    try:
        cfg, rule = _config_rule(args.config, args.rule)
        seconds = _seconds(args.duration)
        request = taps.Request(rule.name, count=args.count or taps.DEFAULT_COUNT,
                               bytes=args.max_bytes or taps.DEFAULT_BYTES, seconds=seconds)
        if request.problem():
            raise errors.ConfigError("the command line", [str(request.problem())])
        out = Path(args.out)
        done = _from_broker(cfg, rule, request, out) if args.from_broker else _from_stack(args.config, request, out)
    except PipelineError as e:
        print(f"pipeline record: {e}", file=sys.stderr)
        return e.exit_code
    print(f"recorded {done['kept']} message(s) of rule {rule.name} into {out} ({done['bytes']} bytes; ended: "
          f"{done['reason']}; missed: {done['missed']})")
    return errors.OK


def _config_rule(path: str, name: str) -> tuple[Config, Rule]:
    from pipeline.config import load as config

    cfg = config.load(path)
    try:
        rule = cfg.rule(name)
    except KeyError as e:
        raise errors.ConfigError(path, [str(e.args[0])]) from None
    if rule.trial is not None:  # its input is its rule's: a capture of that rule replays against it (--model)
        raise errors.ConfigError(path, [f"rule '{name}' is the {rule.trial} of rule '{rule.trial_of}': record "
                                        f"'{rule.trial_of}'"])
    return cfg, rule


def _seconds(text: str | None) -> float:
    from pipeline.config.schema.common import duration
    from pipeline.rollout import taps

    if text is None:
        return taps.DEFAULT_SECONDS
    try:
        return float(duration(text))
    except ValueError as e:
        raise errors.ConfigError("--duration", [str(e)]) from None


def _call(method: str, url: str, target: Any) -> dict[str, Any]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, method=method, headers=target.headers)
    try:
        with urllib.request.urlopen(req, timeout=15, context=target.context) as resp:
            return orjson.loads(resp.read())
    except urllib.error.HTTPError as e:
        try:
            body = orjson.loads(e.read() or b"{}")
        except orjson.JSONDecodeError:
            body = {}
        body = body if isinstance(body, dict) else {}
        raise Refused(f"{method} {url}: {e.code} {body.get('title', '')}: {body.get('description', '')}",
                      e.code) from None
    except OSError as e:
        raise Refused(f"{method} {url}: {e}: is the stack running? (else: --from-broker)") from None


def _from_stack(config_file: str, request: Any, out: Path) -> dict[str, Any]:
    """Record through the running stack's tap: start it, wait for its end (a bound) or the duration, move the
    capture to `out`."""
    from pipeline.commands import status

    target = status.target(None, config_file)
    url = f"{target.base}/rules/{request.rule}/record"
    doc = _call("POST", f"{url}?count={request.count}&bytes={request.bytes}&seconds={request.seconds:g}", target)
    deadline, asked = time.monotonic() + request.seconds, doc["id"]
    try:
        while doc.get("state") != "done" and time.monotonic() < deadline:
            time.sleep(0.25)
            doc = _status(url, target, asked)
    except KeyboardInterrupt:
        pass  # stopped by hand: what was recorded is kept
    if doc.get("state") != "done":
        doc = _call("DELETE", url, target)
    if doc.get("reason", "").startswith("error") or not doc.get("path"):
        raise Refused(f"the recording failed: {doc.get('reason')}")
    shutil.move(doc["path"], out)
    return doc


def _status(url: str, target: Any, asked: str) -> dict[str, Any]:
    """The status of the recording `asked`; "asked" while ingress has not taken it yet."""
    try:
        doc = _call("GET", url, target)
    except Refused as e:
        if e.status != 404:
            raise
        doc = {}
    return doc if doc.get("id") == asked else {"id": asked, "state": "asked"}


def _from_broker(cfg: Config, rule: Rule, request: Any, out: Path) -> dict[str, Any]:
    """Record by a subscription of our own to the rule's filter (without its share group: a member of the group
    would take messages from the stack)."""
    import os

    from pipeline.rollout import capture
    from pipeline.wire.mqtt import Hub, Link

    writer = capture.Writer(out.resolve(), capture.header(rule.name, rule.model, "broker", rule.sub.topic))
    got = {"kept": 0, "missed": 0, "bytes": 0, "reason": "seconds"}
    link = Link(rule.sub.broker, cfg.brokers[rule.sub.broker],
                f"{cfg.instance}-record-{os.urandom(3).hex()}", clean_session=True, manual_ack=True)
    link.subscribe(rule.sub.topic, rule.sub.qos)

    def arrive(topic: str, payload: bytes, qos: int, mid: int, *_: Any) -> None:
        if qos:
            link.client.puback(mid)
        if got["reason"] != "seconds":
            return
        packed = capture.pack(capture.Record(topic, payload, time.time(), qos))
        if len(packed) > capture.MAX_RECORD:
            got["missed"] += 1
        elif writer.bytes + len(packed) > request.bytes:
            got["reason"] = "bytes"
        else:
            writer.write(packed)
            got["kept"] += 1
            if got["kept"] >= request.count:
                got["reason"] = "count"

    link.on_publish = arrive
    hub = Hub([link])
    deadline = time.monotonic() + request.seconds
    try:
        while got["reason"] == "seconds" and time.monotonic() < deadline:
            hub.poll(100)
            hub.flush()
    except KeyboardInterrupt:
        got["reason"] = "stopped"
    finally:
        hub.flush()
        link.stop()
    if not link.connects:
        writer.discard()
        raise Refused(f"broker {rule.sub.broker} ({cfg.brokers[rule.sub.broker].url}): never connected")
    writer.finish()
    got["bytes"] = writer.bytes
    return got


def cmd_replay(args: argparse.Namespace) -> int:
    from pipeline.rollout import diff

    why = diff.limit_problem(args.max_diff)
    if why:
        print(f"pipeline replay: {why}", file=sys.stderr)
        return errors.CONFIG_ERROR
    try:
        report = _replay(args)
    except PipelineError as e:
        print(f"pipeline replay: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return INTERRUPTED
    print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() if args.json else diff.text(report))
    return errors.OK if report["passed"] else 1


def _replay(args: argparse.Namespace) -> dict[str, Any]:
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.rollout import capture, diff, replay

    head, records = capture.read_all(Path(args.capture))
    cfg = _config(args.config) if args.config else None
    rule = _rule(cfg, head)
    speed = _speed(args.speed)
    with tempfile.TemporaryDirectory(prefix="pipeline-replay-") as scratch:
        versions = {"new": _version(args.model, cfg, head, Path(scratch))}
        if args.against:
            versions["current"] = _version(args.against, cfg, head, Path(scratch))
        with ThreadPoolExecutor(len(versions)) as pool:
            runs = {label: pool.submit(replay.Player(rule, v, speed).play, records) for label, v in versions.items()}
            outcomes = {label: f.result() for label, f in runs.items()}
    report: dict[str, Any] = {"capture": args.capture, "rule": rule.name, "messages": len(records),
                              "speed": args.speed, "max_diff": args.max_diff,
                              "sides": {k: diff.side(o, versions[k].given) for k, o in outcomes.items()}}
    if "current" in outcomes:
        msgs, _ = replay.messages(rule, records)
        keys_of = [m.key or "(no key)" for m in msgs] if rule.key is not None else [r.topic for r in records]
        report["diff"] = d = diff.compare(records, keys_of, outcomes["new"], outcomes["current"])
        report["passed"] = not diff.over(d["messages"], len(records), args.max_diff)
    else:
        report["passed"] = True
    return report


def _config(path: str) -> Config:
    from pipeline.config import load as config

    return config.load(path)


def _rule(cfg: Config | None, head: dict[str, Any]) -> Rule:
    """The capture's rule as the config has it; without a config, a rule with the defaults (results published on
    replay/<rule>)."""
    if cfg is not None:
        try:
            return cfg.rule(head["rule"])
        except KeyError as e:
            raise errors.ConfigError(cfg.source, [f"the capture is of rule '{head['rule']}': {e.args[0]}"]) from None
    from pipeline.config.schema.rules import Rule

    return Rule.model_validate({"name": head["rule"], "model": head["model"], "sub": {"broker": "replay",
                                "topic": "#"}, "pub": {"broker": "replay", "topic": f"replay/{head['rule']}"}})


def _speed(text: str) -> float | None:
    if text == "max":
        return None
    try:
        value = float(text.removesuffix("x"))
    except ValueError:
        value = 0.0
    if not value > 0:
        raise errors.ConfigError("--speed", [f"expected max or a factor such as 10x (got {text!r})"])
    return value


def _version(given: str, cfg: Config | None, head: dict[str, Any], scratch: Path) -> Version:
    """A version named on the command line: a folder or archive (params of the capture's model in the config,
    when given), else a model of the config."""
    from pipeline.models import packages
    from pipeline.rollout.replay import Version

    path = Path(given)
    data_dir = cfg.default_data_dir() if cfg is not None else scratch
    limits = cfg.packages.limits() if cfg is not None else packages.Limits()
    if path.exists():
        name = head["model"]
        params = dict(cfg.models[name].params) if cfg is not None and name in cfg.models else {}
        folder = packages.resolve(name, packages.ModelSource(path=path.resolve()), scratch, limits)
        return Version(name, folder, params, given)
    if cfg is None or given not in cfg.models:
        where = f"nor a model of {cfg.source}" if cfg is not None else "(a model name needs -c FILE)"
        raise errors.ConfigError("the command line", [f"{given!r} is no model folder or archive {where}"])
    spec = cfg.models[given]
    folder = packages.resolve(given, spec.source, data_dir, limits)
    return Version(given, folder, dict(spec.params), given)
