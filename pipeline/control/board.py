"""The stats board: the snapshots of every stage process, received on a ZMQ SUB socket.

The SUB socket lives in one background thread (created there, closed there); request threads only read
copies of the board under a lock. A process is keyed by (pid, started, rule), so a reused pid is a new
process, and a pool process (a snapshot per rule it serves, see pipeline.stages.worker.stage) is an entry per rule.
For each process the board keeps its snapshots of the last WINDOW seconds (rates and recent latency come
from the oldest and the newest of them). A process silent for RETIRE_AFTER seconds is folded into its
stage's retired totals, so its counts stay in the sums while a crash-looping worker cannot grow the board.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

import msgpack
import zmq

from pipeline.errors import PipelineError
from pipeline.telemetry.aggregation import add
from pipeline.wire.endpoints import Endpoints

log = logging.getLogger(__name__)

STALE_AFTER = 2.0  # a process that has not reported for this long is counted as down
WINDOW = 3.0  # rates are measured over about this many seconds
RETIRE_AFTER = 60.0  # a process silent this long is folded into its stage's retired totals

Snapshot = dict[str, Any]


class Board:
    """The stats board of the control process: owns the SUB socket (in its own thread) and the recent
    snapshots of every stage process, keyed by (pid, started, rule). Readers get copies under the lock, never the
    live structures."""

    def __init__(self, endpoints: Endpoints | None = None) -> None:
        self.endpoints = endpoints  # where the stats socket binds (None: a board fed by put() only)
        self._lock = threading.Lock()
        self._procs: dict[tuple[int, float], deque[tuple[float, Snapshot]]] = {}  # (seen, snapshot), oldest first
        self._retired: dict[tuple[str, str | None], Snapshot] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True, name="stats-board")

    def start(self) -> Board:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)

    def put(self, snap: Snapshot, now: float | None = None) -> None:
        """Record one snapshot (`now`: monotonic time of arrival, for tests)."""
        now = time.monotonic() if now is None else now
        key = (snap["pid"], snap.get("started", 0.0), snap.get("rule"))
        with self._lock:
            history = self._procs.setdefault(key, deque())
            history.append((now, snap))
            while len(history) > 1 and history[0][0] < now - WINDOW:
                history.popleft()
            self._retire(now)

    def processes(self, now: float | None = None) -> list[Snapshot]:
        """Latest snapshot of every process with `alive` and, when known, `prev` (its snapshot of about WINDOW
        seconds ago); then one entry per stage for its retired processes (`pid` None, `alive` False)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            histories = [list(h) for h in self._procs.values()]
            retired = [dict(r) for r in self._retired.values()]
        out = []
        for history in histories:
            seen, snap = history[-1]
            proc = {**snap, "alive": now - seen < STALE_AFTER}
            if len(history) > 1:
                old = history[0][1]
                proc["prev"] = {"time": old["time"], "counters": old.get("counters", {}),
                                "histograms": old.get("histograms", {})}
            out.append(proc)
        return out + retired

    def _retire(self, now: float) -> None:
        for key, history in list(self._procs.items()):
            seen, snap = history[-1]
            if now - seen < RETIRE_AFTER:
                continue
            del self._procs[key]
            stage = (snap["stage"], snap.get("rule"))
            into = self._retired.setdefault(stage, {"stage": stage[0], "rule": stage[1], "pid": None, "alive": False,
                                                    "retired": 0, "time": 0.0, "counters": {}, "histograms": {}})
            _fold(into, snap)

    def _listen(self) -> None:
        ctx, sock, guard = zmq.Context.instance(), None, None
        try:
            guard = self.endpoints.guard(ctx)  # remote workers report here too
            sock = self.endpoints.bind(ctx, zmq.SUB, "stats")
            sock.setsockopt(zmq.SUBSCRIBE, b"")
            sock.setsockopt(zmq.LINGER, 0)
            while not self._stop.is_set():
                if sock.poll(200):
                    self._receive(sock.recv())
        except (zmq.ZMQError, PipelineError) as e:
            log.error("stats board stopped: %s", e)
        finally:
            if sock is not None:
                sock.close()
            if guard is not None:
                guard.stop()

    def _receive(self, frame: bytes) -> None:
        try:
            snap = msgpack.unpackb(frame, raw=False)
            if isinstance(snap, dict) and "pid" in snap and "stage" in snap:
                self.put(snap)
                return
        except (ValueError, msgpack.UnpackException):
            pass
        log.warning("ignored a stats frame that is not a snapshot (%d bytes)", len(frame))


def _fold(into: Snapshot, snap: Snapshot) -> None:
    """Add a dead process's counts to its stage's retired totals."""
    into["retired"] += 1
    into["time"] = max(into["time"], snap.get("time", 0.0))
    for k, v in snap.get("counters", {}).items():
        into["counters"][k] = into["counters"].get(k, 0) + v
    sums = into.setdefault("sums", {})
    for k, h in snap.get("histograms", {}).items():
        into["histograms"][k] = add(into["histograms"].get(k, []), h)
        s, before = snap.get("sums", {}).get(k), sums.get(k, 0.0)
        sums[k] = None if s is None or before is None else before + s  # unknown once any part is unknown
