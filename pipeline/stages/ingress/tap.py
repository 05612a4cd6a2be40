"""The ingress tap: records what a rule receives, when control asks for it (`pipeline.rollout.taps`).

Invariants:
- Off, it costs the ingress thread one truthiness test per message (`Taps.on` is an empty dict).
- On, the ingress thread only appends the message to a deque (`Tap.keep`): no file, no lock, no packing. A tap
  thread of its own polls the requests, packs and writes the capture, and writes the status; it replaces
  `Taps.on` whole and never mutates it, so the ingress thread reads it without a lock.
- Bounded: the deque holds at most MAX_PENDING messages and MAX_PENDING_BYTES of them; what does not fit is not
  kept and is counted (`missed`), never waited for. A recording ends at its count, at its bytes (the file never
  passes them), at its seconds, when its request is removed, or when ingress stops; a message over
  `capture.MAX_RECORD` is counted as missed.
- The capture is written to a hidden name and renamed into `captures/` only once finished (`capture.Writer`);
  a recording an earlier ingress left unfinished is ended ("ingress restarted") and its part file removed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from pathlib import Path

from pipeline.rollout import capture, taps
from pipeline.supervision import run_dir as rundir

log = logging.getLogger("pipeline.ingress.tap")

MAX_PENDING = 50_000  # messages kept and not yet written
MAX_PENDING_BYTES = 64 << 20
WRITE_EVERY = 0.05  # seconds between two passes of the tap thread
POLL_EVERY = 0.2  # seconds between two looks at the requests
REPORT_EVERY = 0.5  # seconds between two statuses of a recording
OVERHEAD = 21  # msgpack bytes of a record besides its topic and payload, at most


class Tap:
    """One recording of one rule. `keep` runs on the ingress thread; the rest on the tap thread."""

    def __init__(self, request: taps.Request, writer: capture.Writer) -> None:
        self.request, self.writer = request, writer
        self.pending: deque[capture.Record] = deque()
        self.kept = self.kept_bytes = self.missed = 0  # written by the ingress thread only
        self.full = ""  # the bound the ingress thread reached: "count" or "bytes"
        self.written = self.written_bytes = 0  # by the tap thread only
        self.status = taps.Status(request.id, request.rule, path=str(writer.path), started_at=time.time(),
                                  bounds={"count": request.count, "bytes": request.bytes,
                                          "seconds": request.seconds})
        self.deadline = time.monotonic() + request.seconds

    def keep(self, topic: str, payload: bytes, qos: int, now: float) -> None:
        """Append a message the rule received (ingress thread): never blocks, never waits."""
        if self.full:
            return
        size = len(topic) + len(payload) + OVERHEAD
        if size > capture.MAX_RECORD or self.kept_bytes - self.written_bytes + size > MAX_PENDING_BYTES or \
                len(self.pending) >= MAX_PENDING:
            self.missed += 1
            return
        self.pending.append(capture.Record(topic, payload, now, qos))
        self.kept += 1
        self.kept_bytes += size
        if self.kept >= self.request.count:
            self.full = "count"

    def write(self) -> str:
        """Write what waits (tap thread); the bound reached, or ''."""
        limit, writer = self.request.bytes, self.writer
        while self.pending:
            record = self.pending.popleft()
            packed = capture.pack(record)
            if writer.bytes + len(packed) > limit:
                self.full = "bytes"
                self.pending.clear()
                return "bytes"
            writer.write(packed)
            self.written += 1
            self.written_bytes += len(record.topic) + len(record.payload) + OVERHEAD
        return self.full

    def report(self, run_dir: Path, state: str = "recording", reason: str = "") -> None:
        s = self.status
        s.state, s.reason, s.kept, s.missed, s.bytes = state, reason, self.written, self.missed, self.writer.bytes
        if state == "done":
            s.ended_at = time.time()
        taps.report(run_dir, s)


class Taps:
    """The taps of one ingress: `on` maps a rule's index to its running `Tap` (replaced whole by the tap thread)."""

    def __init__(self, run_dir: Path, rules: list[tuple[str, str, str]]) -> None:
        """`rules`: (name, model, sub topic) of each rule, in the config's order."""
        self.on: dict[int, Tap] = {}
        self.run_dir, self.rules = run_dir, rules
        self.index = {name: i for i, (name, _, _) in enumerate(rules)}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="tap")
        self._reported = 0.0

    def start(self) -> Taps:
        self._clear_leftovers()
        self.thread.start()
        return self

    def keep(self, targets: tuple[int, ...], topic: str, payload: bytes, qos: int, now: float) -> None:
        """A message for the rules `targets` (ingress thread): kept by the tap of each that has one."""
        on = self.on
        for i in targets:
            tap = on.get(i)
            if tap is not None:
                tap.keep(topic, payload, qos, now)

    def close(self) -> None:
        """End every recording (its capture kept) and the thread."""
        self.stop.set()
        self.thread.join(5.0)

    def _run(self) -> None:
        next_poll = 0.0
        try:
            while not self.stop.wait(WRITE_EVERY):
                now = time.monotonic()
                try:
                    for i, tap in list(self.on.items()):
                        self._write(i, tap, now)
                    if now >= next_poll:
                        next_poll = now + POLL_EVERY
                        self._poll()
                except OSError as e:  # a status or request file (a full disk): the recording's bounds still hold
                    log.warning("tap: %s", e)
        finally:
            for i, tap in list(self.on.items()):
                self._end(i, tap, "ingress stopped")

    def _write(self, i: int, tap: Tap, now: float) -> None:
        try:
            full = tap.write()
        except OSError as e:
            self._end(i, tap, f"error: {e.strerror or e}")
            return
        if full or now >= tap.deadline:
            self._end(i, tap, full or "seconds")
        elif now - self._reported >= REPORT_EVERY:
            self._reported = now
            tap.report(self.run_dir)

    def _poll(self) -> None:
        """Start the recordings asked for, end those whose request was removed or replaced."""
        for i, tap in list(self.on.items()):
            current = taps.asked(self.run_dir, tap.request.rule)
            if current is None or current.id != tap.request.id:
                self._end(i, tap, "stopped")
        folder = self.run_dir / rundir.TAPS
        try:
            names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
        except OSError:
            return
        for rule, i in self.index.items():
            if i not in self.on and rundir.tap_request(self.run_dir, rule).name in names:
                self._begin(i, taps.asked(self.run_dir, rule))

    def _begin(self, i: int, request: taps.Request | None) -> None:
        if request is None:
            return  # unreadable: control writes a new one over it
        if request.problem():  # a file control did not write: said in the status, and removed
            taps.report(self.run_dir, taps.Status(request.id[:32], request.rule, "done", f"error: {request.problem()}"))
            taps.withdraw(self.run_dir, request.rule, request.id)
            return
        done = taps.status(self.run_dir, request.rule)
        if done is not None and done.id == request.id:
            return  # ended already; its request is being removed
        name, model, sub = self.rules[i]
        path = rundir.capture_file(self.run_dir, name, request.id)
        try:
            rundir.private_folder(path.parent)
            tap = Tap(request, capture.Writer(path, capture.header(name, model, "tap", sub)))
        except OSError as e:
            taps.report(self.run_dir, taps.Status(request.id, name, "done", f"error: {e.strerror or e}"))
            taps.withdraw(self.run_dir, name, request.id)
            return
        self.on = {**self.on, i: tap}  # before its status: a status it cannot write must not start it again
        tap.report(self.run_dir)
        log.info("recording rule %s into %s (at most %d messages, %d bytes, %gs)", name, path, request.count,
                 request.bytes, request.seconds)

    def _end(self, i: int, tap: Tap, reason: str) -> None:
        """Stop keeping (ingress no longer sees the tap), write what it kept, finish the file, say so."""
        self.on = {k: v for k, v in self.on.items() if k != i}
        tap.full = tap.full or "stopped"
        try:
            tap.write()
            tap.writer.finish()
        except OSError as e:
            tap.writer.discard()
            reason = f"error: {e.strerror or e}"
        try:
            tap.report(self.run_dir, "done", reason)
            taps.withdraw(self.run_dir, tap.request.rule, tap.request.id)
        except OSError as e:
            log.warning("tap: the status of rule %s's recording: %s", tap.request.rule, e)
        log.info("recording of rule %s ended (%s): %d kept, %d missed", tap.request.rule, reason, tap.written,
                 tap.missed)

    def _clear_leftovers(self) -> None:
        """End the recordings an earlier ingress left (removing the request first: it needs no disk space); a status
        or part file that cannot be written or removed (a full disk) is logged, and ingress starts all the same."""
        for rule in self.index:
            request = taps.asked(self.run_dir, rule)
            try:
                if request is not None and taps.withdraw(self.run_dir, rule, request.id):
                    taps.report(self.run_dir, taps.Status(request.id, rule, "done", "ingress restarted"))
            except OSError as e:
                log.warning("tap: ending the recording of rule %s an earlier ingress left: %s", rule, e)
        folder = self.run_dir / rundir.CAPTURES
        try:
            for part in folder.glob(".*.part") if folder.is_dir() else ():
                part.unlink(missing_ok=True)
        except OSError as e:
            log.warning("tap: removing the part files an earlier ingress left: %s", e)
