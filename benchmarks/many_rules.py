"""Many rules sharing one load: N rules, each on its own topic, carry R msg/s between them, QoS 0.

    python benchmarks/many_rules.py [--rules 30] [--rates 18000] [--duration 10] [--json OUT]

Writes an N-rule config (rule `many-K` subscribes `bench/many/dK/in` and publishes `bench/many/dK/out`, the
bench's echo model, one worker each) beside a Mosquitto with its defaults that it starts on 127.0.0.1:18843,
starts the stack with `pipeline up` (timing it until /readyz), then for each rate runs `pipeline loadgen` over
N devices (d0..dN-1, sent in turn, so each rule gets R/N msg/s) while the bench's receiver counts the results
on `bench/many/+/out`: loss, duplicates, latency, CPU per stage, as `pipeline bench` reports them. Run it from
the checkout (the stack imports the current directory's `pipeline`).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from pipeline.commands.bench import report, runner
from pipeline.commands.bench.bench import run_one
from pipeline.config import load as config

ROOT = Path(__file__).resolve().parent.parent
PORT = 18843
CONTROL = "127.0.0.1:18897"
ECHO = ROOT / "pipeline" / "commands" / "bench" / "models" / "echo"


def write_config(folder: Path, rules: int) -> Path:
    """The N-rule config: one topic, one worker and the echo model per rule, QoS 0 in and out."""
    body = "".join(f"""\
  - name: many-{k}
    sub: {{broker: local, topic: "bench/many/d{k}/in", qos: 0}}
    model: echo
    pub: {{broker: local, topic: "bench/many/d{k}/out", qos: 0}}
    errors: {{topic: "bench/many/d{k}/errors"}}
    workers: 1
""" for k in range(rules))
    path = folder / "many.yaml"
    path.write_text(f"""\
name: many-rules
brokers:
  local: {{url: "mqtt://127.0.0.1:{PORT}"}}
models:
  echo: {{path: {ECHO}}}
rules:
{body}control: {{listen: "{CONTROL}"}}
data_dir: {folder / 'data'}
""")
    return path


def start_broker(folder: Path) -> subprocess.Popen:
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", PORT)) == 0:
            raise SystemExit(f"something already listens on {PORT}: stop it first")
    (folder / "mosquitto.conf").write_text(f"listener {PORT} 127.0.0.1\nallow_anonymous true\n")
    broker = subprocess.Popen(["mosquitto", "-c", str(folder / "mosquitto.conf")], stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return broker


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rules", type=int, default=30)
    ap.add_argument("--rates", type=float, nargs="+", default=[18000.0])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per rate")
    ap.add_argument("--json", help="also write the runs here")
    args = ap.parse_args()
    os.environ["PYTHONPATH"] = os.getcwd()  # the stack imports this checkout
    console = Console(width=150)
    folder = Path(tempfile.mkdtemp(prefix="many-rules-"))
    cfg = config.load(write_config(folder, args.rules))
    broker = start_broker(folder)
    stack = runner.OwnStack(cfg, [])
    try:
        t0 = time.monotonic()
        stack.wait_ready(120)
        console.print(f"{args.rules} rules ready after {time.monotonic() - t0:.2f} s")
        target = runner.Target(0, f"many-0..many-{args.rules - 1}", f"mqtt://127.0.0.1:{PORT}",
                               "bench/many/{device}/in", f"mqtt://127.0.0.1:{PORT}", "bench/many/+/out",
                               "bench/many/+/errors")
        opts = argparse.Namespace(duration=args.duration, devices=args.rules, shape="flat", payload_bytes=150)
        runs = []
        for rate in args.rates:
            runs.append(run_one(target, rate, opts, stack.run_dir))
            report.print_run(console, runs[-1])
    finally:
        stack.stop()
        broker.terminate()
        broker.wait()
    console.print(report.summary_table(runs))
    if args.json:
        settings = {"rules": args.rules, "rates": args.rates, "duration_s": args.duration, "qos": 0}
        report.write_json(args.json, report.document(cfg.source, settings, runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
