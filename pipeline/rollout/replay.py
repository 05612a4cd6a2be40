"""A capture through a model version, in worker processes, as the stack would run it.

`play` runs the messages of a capture through one `Version` in a `rollout.worker` process: frames of up to FRAME
messages (at `speed` max, consecutive ones; paced, those due by their recorded times divided by the speed),
the real loader, `Context`, `Processor`, codec and `handler_batch`, and the rule's `timeout` enforced by the
worker's watchdog. What ingress does around the worker is done here the same way: a payload over
`max_payload_bytes` is a `payload_too_large` record without a call; a keyed rule's message carries its key and
its key's state as the previous result of that key left it (a frame holds a key once; states start empty);
after a timeout the worker process is replaced, the message to blame goes again with one attempt more (each
QoS 1 message of a `handler_batch` call of several when none is to blame, each alone) up to `max_attempts`,
then is a dead letter (`timeout`), the frame's other unanswered QoS 1 messages go again as they were.

Every message gets exactly one `Result`, at the index of its record; message ids are `replay-<index>`, so two
runs of one capture give a deterministic model the same inputs.
"""

from __future__ import annotations

import multiprocessing
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import topics
from pipeline.errors import ModelLoadError
from pipeline.keyed import keys
from pipeline.models import codec
from pipeline.rollout import worker
from pipeline.rollout.capture import Record
from pipeline.wire import frames
from pipeline.wire.frames import Message, Result

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from pipeline.config.load import Rule

FRAME = 32  # messages of one frame at most, as ingress sends them
START_TIMEOUT = 120.0  # seconds a worker may take to import its model and run init


@dataclass(frozen=True)
class Version:
    """A model version to replay: the name its Context gives it, the folder holding its index.py, its params,
    and how the command line named it."""

    name: str
    folder: Path
    params: dict[str, Any]
    given: str


@dataclass
class Outcome:
    """What one version made of a capture: one Result per record (by index), the version's sha256, how many times
    its worker was replaced (timeouts), and the seconds the run took."""

    results: list[Result]
    sha256: str = ""
    restarts: int = 0
    seconds: float = 0.0


@dataclass
class _Run:
    msgs: list[Message]
    results: list[Result | None]
    pending: deque[int]
    retry: deque[int] = field(default_factory=deque)
    states: dict[str, tuple[bytes, int]] = field(default_factory=dict)


def messages(rule: Rule, records: list[Record]) -> tuple[list[Message], dict[int, Result]]:
    """The Messages of a capture's records, and the results ingress would give without a worker (payload over
    max_payload_bytes; a keyed rule's message without a key value)."""
    parts = keys.parse(rule.key) if rule.key is not None else None
    error_topic = topics.compile_template(rule.error_topic)
    out, settled = [], {}
    for i, r in enumerate(records):
        m = Message(f"replay-{i}", rule.name, "replay", r.topic, r.payload, r.qos, 0, 1, r.time)
        if len(r.payload) > rule.max_payload_bytes:
            err = f"payload of {len(r.payload)} bytes is over max_payload_bytes ({rule.max_payload_bytes})"
            settled[i] = frames.error_result(m, error_topic(r.topic), "payload_too_large", err)
        elif parts is not None:
            try:
                m = m._replace(key=keys.key_of(parts, r.topic, lambda p=r.payload: codec.decode_event(p)))
            except (keys.NoKey, codec.BadPayload) as e:
                if rule.key_default is None:
                    reason = "bad_payload" if isinstance(e, codec.BadPayload) else "no_key"
                    settled[i] = frames.error_result(m, error_topic(r.topic), reason, e)
                m = m._replace(key=rule.key_default)
        out.append(m)
    return out, settled


class Player:
    """Plays the messages through one version's worker process."""

    def __init__(self, rule: Rule, version: Version, speed: float | None) -> None:
        self.rule, self.version, self.speed = rule, version, speed  # speed None: as fast as the worker goes
        self.error_topic = topics.compile_template(rule.error_topic)
        self.mp = multiprocessing.get_context("spawn")
        self.conn: Connection | None = None
        self.process: Any = None

    def play(self, records: list[Record]) -> Outcome:
        msgs, settled = messages(self.rule, records)
        run = _Run(msgs, [settled.get(i) for i in range(len(msgs))],
                   deque(i for i in range(len(msgs)) if i not in settled))
        out = Outcome([])
        out.sha256 = self._start()
        started = time.monotonic()
        try:
            while run.pending or run.retry:
                frame = self._frame(run, records, started)
                if frame:
                    out.restarts += self._send(run, frame)
        finally:
            self._stop()
        out.seconds = time.monotonic() - started
        out.results = [r for r in run.results if r is not None]
        return out

    def _frame(self, run: _Run, records: list[Record], started: float) -> list[int]:
        """The indices of the next frame: a suspect alone, else what is due, each key once."""
        if run.retry:
            return [run.retry.popleft()]
        if self.speed is not None:
            wait = (records[run.pending[0]].time - records[0].time) / self.speed - (time.monotonic() - started)
            if wait > 0:
                time.sleep(min(wait, 0.5))
                return []
        frame: list[int] = []
        seen: set[str | None] = set()
        now = time.monotonic() - started
        while run.pending and len(frame) < FRAME:
            i = run.pending[0]
            key = run.msgs[i].key
            if (key is not None and key in seen) or (
                    self.speed is not None and (records[i].time - records[0].time) / self.speed > now):
                break
            seen.add(key)
            frame.append(run.pending.popleft())
        return frame

    def _send(self, run: _Run, frame: list[int]) -> int:
        """Send one frame and take its results; after a timeout, replace the worker. Returns the restarts (0, 1)."""
        assert self.conn is not None
        batch = [self._with_state(run, run.msgs[i]) for i in frame]
        self.conn.send(batch)
        try:
            kind, body = self.conn.recv()
        except EOFError:  # the worker died without a word (a crash in C code, os._exit)
            self._died(run, frame, batch)
            return 1
        if kind == worker.RESULTS:
            self._settle(run, frame, body)
            return 0
        culprit, partial = body
        self._settle(run, frame, partial)
        self._again(run, frame, culprit)
        self._stop()
        self._start()
        return 1

    def _died(self, run: _Run, frame: list[int], batch: list[Message]) -> None:
        for i, m in zip(frame, batch, strict=True):
            if m.qos == 0:
                run.results[i] = frames.error_result(m, self.error_topic(m.topic), "worker_died",
                                                     "the worker died while holding it")
        self._again(run, frame, None, "worker died while holding it", "worker_died")
        self._stop()
        self._start()

    def _with_state(self, run: _Run, m: Message) -> Message:
        if m.key is None:
            return m
        state, version = run.states.get(m.key, (b"", 0))
        return m._replace(state=state, base=version)

    def _settle(self, run: _Run, frame: list[int], results: list[Result]) -> None:
        index = {run.msgs[i].id: i for i in frame}
        for r in results:
            i = index[r.message_id]
            run.results[i] = r
            if r.key is not None and r.state is not None:
                run.states[r.key] = (r.state, run.states.get(r.key, (b"", 0))[1] + 1)

    def _again(self, run: _Run, frame: list[int], culprit: str | None, why: str = "", reason: str = "timeout") -> None:
        """The frame's unanswered QoS 1 messages after its worker stopped: the one to blame (every one, when
        none is named) with one attempt more, or a dead letter; the others as they were, before the backlog."""
        why = why or f"timeout after {self.rule.timeout:g}s"
        unanswered = [i for i in frame if run.results[i] is None]
        again = []
        for i in unanswered:
            m = run.msgs[i]
            if culprit is not None and m.id != culprit:
                again.append(i)
            elif m.attempt >= self.rule.max_attempts:
                err = f"{why} (attempt {m.attempt} of {self.rule.max_attempts})"
                run.results[i] = frames.error_result(m, self.error_topic(m.topic), reason, err)
            else:
                run.msgs[i] = m._replace(attempt=m.attempt + 1)
                run.retry.append(i)
        run.pending.extendleft(reversed(again))

    def _start(self) -> str:
        """Start the worker process; its model's sha256 once it is ready; ModelLoadError when it cannot load."""
        v = self.version
        self.conn, child = self.mp.Pipe()
        self.process = self.mp.Process(target=worker.serve, args=(child, self.rule, v.name, v.folder, v.params),
                                       daemon=True, name=f"replay-{v.name}")
        self.process.start()
        child.close()
        if not self.conn.poll(START_TIMEOUT):
            self._stop()
            raise ModelLoadError(f"{v.given}: the model did not load within {START_TIMEOUT:g}s")
        try:
            kind, body = self.conn.recv()
        except EOFError:
            raise ModelLoadError(f"{v.given}: the worker process died while loading the model") from None
        if kind != worker.READY:
            self._stop()
            raise ModelLoadError(f"{v.given}: {body}")
        return str(body)

    def _stop(self) -> None:
        if self.conn is not None:
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.conn.close()
            self.conn = None
        if self.process is not None:
            self.process.join(5)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(5)
            self.process = None
