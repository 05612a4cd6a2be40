"""Stage statistics: each stage keeps plain counters and publishes a snapshot twice a second.

The hot path only increments ints in a dict; `Reporter.tick()` compares a monotonic clock (no syscall
on Linux: vDSO) and sends one small msgpack frame on a PUB socket connected to the control process.
PUB never blocks: with no control process listening the snapshot is simply not delivered.
"""

from __future__ import annotations

import bisect
import logging
import os
import resource
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgpack
import zmq

if TYPE_CHECKING:
    from pipeline.wire.endpoints import Endpoints

INTERVAL = 0.5
# upper bounds (seconds) of latency histogram buckets; one more bucket counts everything above the last
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_PAGE = os.sysconf("SC_PAGE_SIZE")
REJECT_LOG_EVERY = 60.0  # seconds between two log lines about the same kind of refused input


def process_usage() -> dict[str, float]:
    """RSS (bytes) and CPU time (seconds) of this process, read twice a second, not per message."""
    with open("/proc/self/statm", "rb") as f:
        rss = int(f.read().split()[1]) * _PAGE
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"rss_bytes": rss, "cpu_seconds": ru.ru_utime + ru.ru_stime}


class Reporter:
    """One stage process's counters, latency histograms and gauges, sent to the stats board as snapshots."""

    OPTIONS = {zmq.LINGER: 0, zmq.SNDHWM: 100}  # of the PUB socket: a stats board that is down costs nothing

    def __init__(self, sock: zmq.Socket, stage: str, rule: str | None = None) -> None:
        self.sock = sock  # PUB, connected to the stats board
        self.counters: dict[str, int] = {}
        self.histograms: dict[str, list[int]] = {}  # name -> count per bucket of BUCKETS, then +Inf
        self.sums: dict[str, float] = {}  # name -> total seconds observed
        self.gauges: dict[str, Callable[[], Any]] = {}
        self.head = {"stage": stage, "rule": rule, "pid": os.getpid(), "started": time.time()}
        self._next = 0.0
        self._rejects: dict[str, tuple[float, int]] = {}  # counter -> (when it was last logged, count since)
        self.log = logging.getLogger(f"pipeline.{stage}")

    @classmethod
    def connect(cls, eps: Endpoints, stage: str, rule: str | None = None) -> Reporter:
        """A reporter of this process to the stack's stats board."""
        return cls(eps.connect(zmq.Context.instance(), zmq.PUB, "stats", options=cls.OPTIONS), stage, rule)

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def reject(self, counter: str, detail: str) -> None:
        """Input refused at this stage's boundary (a malformed or forged frame or packet): counted under
        `counter`, and logged: the first of each counter at once, then at most once a minute with the count."""
        self.count(counter)
        now = time.monotonic()
        last, since = self._rejects.get(counter, (-REJECT_LOG_EVERY, 0))
        if now - last < REJECT_LOG_EVERY:
            self._rejects[counter] = (last, since + 1)
            return
        self._rejects[counter] = (now, 0)
        more = f" ({since} more since the last report)" if since else ""
        self.log.warning("refused input, counted in %s: %s%s", counter, detail[:300], more)

    def observe(self, name: str, seconds: float) -> None:
        h = self.histograms.get(name)
        if h is None:
            h = self.histograms[name] = [0] * (len(BUCKETS) + 1)
        h[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.sums[name] = self.sums.get(name, 0.0) + seconds

    def tick(self, force: bool = False) -> None:
        now = time.monotonic()
        if now < self._next and not force:
            return
        self._next = now + INTERVAL
        snap = {**self.head, "time": time.time(), "counters": self.counters, "histograms": self.histograms,
                "sums": self.sums,
                **process_usage()}
        snap.update({k: f() for k, f in self.gauges.items()})
        try:
            self.sock.send(msgpack.packb(snap, use_bin_type=True), zmq.NOBLOCK)
        except zmq.Again:
            pass

    def close(self) -> None:
        self.tick(force=True)
        self.sock.close()
