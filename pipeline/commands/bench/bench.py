"""`pipeline bench`: start a stack (or use a running one), drive load at each QoS and rate, report.

Each run: the receiver subscribes to the rule's output (and error) topics; a `pipeline loadgen`
subprocess (its own interpreter, so it does not share the receiver's GIL) sends rate x duration
messages (unpaced for `max`, for `duration`); the bench waits until every result is back or nothing
arrives for a few seconds; meanwhile it samples CPU and RSS of the stack's processes, the load generator
and itself.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console

from pipeline.commands.bench import loadgen, report, runner
from pipeline.commands.bench.procstat import Sampler, stack_processes
from pipeline.commands.bench.receiver import Receiver, analyse
from pipeline.commands.bench.runner import BenchError, Target
from pipeline.config import load as config
from pipeline.errors import PipelineError

IDLE = 3.0  # a run ends when no result arrived for this long (or all arrived)


def loadgen_args(t: Target, rate: float, args: argparse.Namespace, out: str) -> list[str]:
    count = int(rate * args.duration) if rate else loadgen.UNBOUNDED
    cmd = [sys.executable, "-m", "pipeline", "loadgen", "--url", t.in_url, "--topic", t.in_topic,
           "--devices", str(args.devices), "--rate", f"{rate:g}" if rate else "max", "-n", str(count),
           "--qos", str(t.qos), "--shape", args.shape, "--payload-bytes", str(args.payload_bytes),
           "--json", out, "--quiet"]
    return cmd + (["--duration", f"{args.duration:g}s"] if not rate else [])


def drive(t: Target, rate: float, args: argparse.Namespace, sampler: Sampler) -> dict[str, Any]:
    """Run `pipeline loadgen` to completion; return its summary."""
    fd, out = tempfile.mkstemp(prefix="bench-loadgen-", suffix=".json")
    os.close(fd)
    proc = subprocess.Popen(loadgen_args(t, rate, args, out), stderr=subprocess.PIPE)
    try:
        sampler.add(proc.pid, "loadgen")
        try:
            _, err = proc.communicate(timeout=args.duration * 3 + 60)
        except subprocess.TimeoutExpired:
            raise BenchError("loadgen did not finish in time") from None
        text = Path(out).read_bytes()
        if not text:
            raise BenchError(f"loadgen failed (exit {proc.returncode}): {err.decode(errors='replace').strip()}")
        return orjson.loads(text)
    finally:
        if proc.poll() is None:  # interrupted or timed out
            proc.kill()
            proc.wait()
        os.unlink(out)


def run_one(t: Target, rate: float, args: argparse.Namespace, run_dir: Path | None) -> dict[str, Any]:
    """One (QoS, rate) run; returns its figures as a JSON-ready dict."""
    recv = Receiver(t.out_url, [t.out_filter], t.qos, (t.error_filter,))
    try:
        since = time.time()
        sampler = Sampler(run_dir, {os.getpid(): "bench"}).start()
        summary = drive(t, rate, args, sampler)
        recv.wait_for(summary["sent"], idle=IDLE, limit=30 + args.duration)
        stages = {name: asdict(u) for name, u in sampler.stop().items()}
        records, errors = list(recv.records), recv.errors
    finally:
        recv.close()
    rep = analyse(records, summary["sent"], since)
    rep.errors = errors
    rep.lost = max(0, rep.lost - errors)  # an error record is an answer, not a loss
    return {"qos": t.qos, "rate": rate or "max", "rule": t.rule, "offered": summary["achieved_rate"],
            **rep.as_dict(), "stages": stages, "loadgen": summary}


def settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"rates": [r or "max" for r in args.rates], "qos": args.qos, "duration_s": args.duration,
            "url": args.url, "workers": args.workers, "shape": args.shape, "payload_bytes": args.payload_bytes,
            "devices": args.devices}


def run_all(console: Console, targets: list[Target], args: argparse.Namespace, run_dir: Path | None,
            runs: list[dict]) -> None:
    """Every (QoS, rate) run in turn; each result is appended to `runs` as soon as it is known."""
    for t in targets:
        for rate in args.rates:
            what = f"QoS {t.qos} at {report.rate_label(rate)} msg/s for {args.duration:g} s (rule {t.rule})"
            with console.status(f"running {what}"):
                runs.append(run_one(t, rate, args, run_dir))
            report.print_run(console, runs[-1])


def _targets(args: argparse.Namespace) -> tuple[config.Config, list[Target]]:
    cfg = config.load(args.config)
    return cfg, [runner.target(cfg, q, args.url) for q in args.qos]


def _interrupt(_sig: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main(args: argparse.Namespace) -> int:
    console = Console(width=None if sys.stdout.isatty() else 150)  # files and pipes get whole tables
    for sig in (signal.SIGINT, signal.SIGTERM):  # both stop the stack we started (even if SIGINT came ignored)
        signal.signal(sig, _interrupt)
    try:
        cfg, targets = _targets(args)
    except (PipelineError, BenchError) as e:
        console.print(f"[red]bench:[/] {e}", markup=True, highlight=False)
        return getattr(e, "exit_code", 2)
    stack = None if args.url else runner.OwnStack(cfg, args.workers)
    run_dir = stack.run_dir if stack else Path(args.run_dir or cfg.default_run_dir()).resolve()
    runs: list[dict] = []
    code = 0
    try:
        _bench(console, cfg, stack, targets, args, run_dir, runs)
    except (BenchError, ConnectionError, OSError, ValueError) as e:
        console.print(f"[red]bench:[/] {e}", highlight=False)
        code = 1
    except KeyboardInterrupt:
        code = 130
    finally:
        if stack is not None:
            _stop(console, stack, code)
    _finish(console, cfg, args, runs)
    return code


def _stop(console: Console, stack: runner.OwnStack, code: int) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):  # stopping already: let it finish (it has a timeout)
        signal.signal(sig, signal.SIG_IGN)
    stopped = stack.stop(keep=code == 1)
    if code == 1 or stopped:
        console.print(f"stack run directory kept: {stack.run_dir} (pipeline up exited with {stopped})")


def _bench(console: Console, cfg: config.Config, stack: runner.OwnStack | None, targets: list[Target],
           args: argparse.Namespace, run_dir: Path, runs: list[dict]) -> None:
    if stack is not None:
        with console.status(f"starting the stack ({cfg.source}, run dir {run_dir})"):
            stack.wait_ready()
    else:
        runner.wait_ready(cfg.control.listen, 10.0)
    if not stack_processes(run_dir):
        console.print(f"[yellow]note:[/] no process names the run directory {run_dir}: no CPU/RSS per stage "
                      "(pass the stack's --run-dir)", highlight=False)
    console.print(f"stack ready (control http://{cfg.control.listen}); runs: QoS {args.qos} x rates "
                  f"{[report.rate_label(r) for r in args.rates]}, {args.duration:g} s each\n", highlight=False)
    run_all(console, targets, args, run_dir, runs)


def _finish(console: Console, cfg: config.Config, args: argparse.Namespace, runs: list[dict]) -> None:
    if not runs:
        return
    console.print(report.summary_table(runs))
    if args.json:
        report.write_json(args.json, report.document(cfg.source, settings(args), runs))
        console.print(f"wrote {args.json}")
    if args.png:
        console.print(report.plot(args.png, runs), markup=False)
