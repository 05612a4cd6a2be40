"""Stage statistics: each stage keeps plain counters and publishes a snapshot twice a second.

The hot path only increments ints in a dict; `Reporter.tick()` compares a monotonic clock (no syscall
on Linux: vDSO) and sends one small msgpack frame on a PUB socket connected to the control process.
PUB never blocks: with no control process listening the snapshot is simply not delivered.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import msgpack
import zmq

INTERVAL = 0.5


class Reporter:
    def __init__(self, ctx: zmq.Context, address: str, stage: str, rule: str | None = None) -> None:
        self.sock = ctx.socket(zmq.PUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 100)
        self.sock.connect(address)
        self.counters: dict[str, int] = {}
        self.gauges: dict[str, Callable[[], Any]] = {}
        self.head = {"stage": stage, "rule": rule, "pid": os.getpid(), "started": time.time()}
        self._next = 0.0

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def tick(self, force: bool = False) -> None:
        now = time.monotonic()
        if now < self._next and not force:
            return
        self._next = now + INTERVAL
        snap = {**self.head, "time": time.time(), "counters": self.counters}
        snap.update({k: f() for k, f in self.gauges.items()})
        try:
            self.sock.send(msgpack.packb(snap, use_bin_type=True), zmq.NOBLOCK)
        except zmq.Again:
            pass

    def close(self) -> None:
        self.tick(force=True)
        self.sock.close()
