"""What the benchmark drives: the stack under test (`pipeline up` as a subprocess) and its topics.

For each QoS the bench picks the first rule whose subscription and publication both use that QoS; the
load generator publishes on the rule's input filter with its first wildcard replaced by the device name,
and the receiver subscribes to the rule's output template with every `{N}` level replaced by `+`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.commands.bench.procstat import stack_processes
from pipeline.config.load import Broker, Config
from pipeline.errors import PipelineError


class BenchError(PipelineError):
    """The benchmark cannot go on (no rule for a QoS, the stack does not start...)."""


@dataclass(frozen=True)
class Target:
    """The stack a benchmark measures: started by the bench, or one already running."""

    qos: int
    rule: str
    in_url: str  # broker the load generator publishes to
    in_topic: str  # loadgen --topic, with {device}
    out_url: str  # broker the receiver subscribes to
    out_filter: str
    error_filter: str


def broker_url(b: Broker) -> str:
    scheme = "mqtts" if b.scheme == "mqtts" else "mqtt"
    return f"{scheme}://{b.host}:{b.port}"


def input_topic(sub_filter: str) -> str:
    """A concrete topic matching `sub_filter`: first wildcard -> {device}, other wildcards -> x."""
    levels, placed = [], False
    for level in sub_filter.split("/"):
        if level in ("+", "#"):
            levels.append("x" if placed else "{device}")
            placed = True
        else:
            levels.append(level)
    return "/".join(levels)


def output_filter(template: str) -> str:
    """A filter matching every topic the output template renders to: templated levels -> +."""
    return "/".join("+" if "{" in level else level for level in template.split("/"))


def target(cfg: Config, qos: int, url: str | None = None) -> Target:
    """The rule that carries QoS `qos` end to end; `url` overrides both brokers (a running stack's)."""
    for rule in cfg.rules:
        if rule.sub.qos == qos and rule.pub.qos == qos:
            in_url = url or broker_url(cfg.brokers[rule.sub.broker])
            out_url = url or broker_url(cfg.brokers[rule.pub.broker])
            return Target(qos, rule.name, in_url, input_topic(rule.sub.topic), out_url,
                          output_filter(rule.pub.topic), output_filter(rule.error_topic))
    raise BenchError(f"{cfg.source}: no rule subscribes and publishes at QoS {qos} (one per QoS is needed)")


def ready(control: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{control}/readyz", timeout=2) as r:
            return r.status == 200
    except (OSError, urllib.error.HTTPError):
        return False


def wait_ready(control: str, timeout: float, alive: Callable[[], bool] = lambda: True) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready(control):
            return
        if not alive():
            raise BenchError("the stack exited before it was ready")
        time.sleep(0.2)
    raise BenchError(f"the stack is not ready after {timeout:g}s (http://{control}/readyz is not 200)")


class OwnStack:
    """`pipeline up -c CONFIG` in a fresh run directory, its output in <run dir>/up.log."""

    def __init__(self, cfg: Config, workers: list[str]) -> None:
        self.cfg = cfg
        self.run_dir = Path(tempfile.mkdtemp(prefix="pipeline-bench-"))
        self.log = self.run_dir / "up.log"
        args = [sys.executable, "-m", "pipeline", "up", "-c", str(cfg.source), "--run-dir", str(self.run_dir)]
        for w in workers:
            args += ["--workers", w]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 60.0) -> None:
        try:
            wait_ready(self.cfg.control.listen, timeout, lambda: self.proc.poll() is None)
        except BenchError as e:
            raise BenchError(f"{e}; pipeline up said:\n{self.tail()}") from None

    def tail(self, lines: int = 20) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, keep: bool = False) -> int | None:
        """Stop the stack; remove its run directory unless `keep` (or it did not stop cleanly)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            _kill([self.proc.pid], signal.SIGKILL)
            code = self.proc.wait()
        if self._reap() and code == 0:
            code = -1  # pipeline up left processes behind
        if code == 0 and not keep:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        return code

    def _reap(self) -> bool:
        """End what is left of the stack (supervisord runs in its own session); True if anything was."""
        left = list(stack_processes(self.run_dir))
        if not left:
            return False
        _kill(left, signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        while stack_processes(self.run_dir) and time.monotonic() < deadline:
            time.sleep(0.1)
        _kill(list(stack_processes(self.run_dir)), signal.SIGKILL)
        return True


def _kill(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, sig)
