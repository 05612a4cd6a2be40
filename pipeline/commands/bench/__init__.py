"""Load generator and benchmark: `pipeline loadgen` and `pipeline bench`.

Only argument parsing lives here; the commands import their modules (paho, rich, matplotlib) when run,
so `pipeline --help` stays fast.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration(text: str) -> float:
    """'20s', '500ms', '2m', '1h' or a plain number of seconds -> seconds (argparse type)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", text)
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"expected a duration such as 500ms, 20s or 2m (got {text!r})")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def rate(text: str) -> float:
    """A rate in messages per second, or 'max' (= 0: unpaced)."""
    if text.strip().lower() == "max":
        return 0.0
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected messages per second > 0 or 'max' (got {text!r})")
    return value


def listed(item: Any) -> Any:
    """A comma-separated list of `item` values (argparse type)."""
    return lambda text: [item(part) for part in text.split(",") if part.strip()]


def qos(text: str) -> int:
    if text.strip() not in ("0", "1"):
        raise argparse.ArgumentTypeError(f"expected QoS 0 or 1 (got {text!r})")
    return int(text)


def add_commands(sub: Any) -> None:
    """Add `loadgen` and `bench` to the `pipeline` command's subparsers."""
    _add_loadgen(sub)
    _add_bench(sub)


def _add_loadgen(sub: Any) -> None:
    lg = sub.add_parser("loadgen", help="publish fake telemetry at a steady rate",
                        description="Publish fake telemetry on MQTT, evenly paced, with seq and send time.")
    lg.set_defaults(func=_loadgen)
    lg.add_argument("--url", default="mqtt://127.0.0.1:1883", help="broker: mqtt://[USER:PASS@]HOST[:PORT]")
    lg.add_argument("--topic", default="plant/{device}/telemetry", help="{device} becomes the device name")
    lg.add_argument("--devices", type=int, default=100, help="devices, round robin (default 100)")
    lg.add_argument("--rate", type=rate, default=1000.0, help="messages per second, or 'max' (default 1000)")
    lg.add_argument("-n", "--count", type=int, help="messages to send (default 10000, or unbounded with --duration)")
    lg.add_argument("--duration", type=duration, help="stop after this long (e.g. 20s)")
    lg.add_argument("--qos", type=qos, default=0)
    lg.add_argument("--shape", choices=("flat", "pyboot"), default="flat")
    lg.add_argument("--payload-bytes", type=int, default=0, help="pad each message to about N bytes")
    lg.add_argument("--client-id", help="MQTT client id (default loadgen-PID)")
    lg.add_argument("--json", metavar="OUT", help="also write the summary as JSON to OUT")
    lg.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary")


def _add_bench(sub: Any) -> None:
    b = sub.add_parser("bench", help="drive a stack with load and report loss, latency, CPU and RSS",
                       description="Start the stack (or use a running one), drive load at each rate and QoS, "
                                   "listen on the output topics and report per run.")
    b.set_defaults(func=_bench)
    b.add_argument("-c", "--config", required=True, help="the stack's YAML configuration (e.g. conf/bench.yaml)")
    b.add_argument("--rates", type=listed(rate), default=[1000.0, 5000.0, 0.0], help="default 1000,5000,max")
    b.add_argument("--qos", type=listed(qos), default=[0, 1], help="QoS levels to run, default 0,1")
    b.add_argument("--duration", type=duration, default=20.0, help="per run (default 20s)")
    b.add_argument("--url", help="use the running stack on this broker instead of starting one")
    b.add_argument("--run-dir", help="run directory of the running stack (with --url; to find its processes)")
    b.add_argument("--workers", action="append", default=[], metavar="RULE=N", help="passed to pipeline up")
    b.add_argument("--shape", choices=("flat", "pyboot"), default="flat")
    b.add_argument("--payload-bytes", type=int, default=150, help="message size (default about 150 bytes)")
    b.add_argument("--devices", type=int, default=100)
    b.add_argument("--json", metavar="OUT", help="write the results as JSON")
    b.add_argument("--png", metavar="OUT", help="plot latency vs throughput (needs matplotlib: pip install .[bench])")


def _loadgen(args: argparse.Namespace) -> int:
    from pipeline.commands.bench import loadgen

    count = args.count if args.count is not None else (loadgen.UNBOUNDED if args.duration else 10_000)
    opts = loadgen.Options(url=args.url, topic=args.topic, devices=args.devices, rate=args.rate, count=count,
                           duration=args.duration, qos=args.qos, shape=args.shape, payload_bytes=args.payload_bytes)
    if args.client_id:
        opts.client_id = args.client_id
    return loadgen.main(opts, args.json, args.quiet)


def _bench(args: argparse.Namespace) -> int:
    from pipeline.commands.bench import bench

    return bench.main(args)
