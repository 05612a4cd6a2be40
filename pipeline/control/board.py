"""The stats board: latest snapshot of every stage process, received on a ZMQ SUB socket.

The SUB socket lives in one background thread (created there, closed there); request threads only read
copies of the board under a lock.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import msgpack
import zmq

STALE_AFTER = 2.0  # a process that has not reported for this long is counted as down


class Board:
    def __init__(self, address: str) -> None:
        self.address = address
        self._lock = threading.Lock()
        self._procs: dict[int, dict[str, Any]] = {}  # pid -> last snapshot (dead pids kept: their counts stay)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True, name="stats-board")

    def start(self) -> Board:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)

    def put(self, snap: dict[str, Any]) -> None:
        snap["seen"] = time.monotonic()
        with self._lock:
            self._procs[snap["pid"]] = snap

    def processes(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        with self._lock:
            procs = [dict(p) for p in self._procs.values()]
        for p in procs:
            p["alive"] = now - p.pop("seen") < STALE_AFTER
        return procs

    def _listen(self) -> None:
        sock = zmq.Context.instance().socket(zmq.SUB)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(self.address)
        try:
            while not self._stop.is_set():
                if sock.poll(200):
                    self.put(msgpack.unpackb(sock.recv(), raw=False))
        finally:
            sock.close()
