"""Per-rule dispatch: the backlog, credit-based sending to workers, and in-flight tracking.

QoS 1 messages stay "in flight" (with the worker holding them) until egress confirms their result is safe.
A worker answers frames in the order it got them, so a CREDIT of n answers the n oldest messages sent to it:
only then does a message's deadline start (its result is on the way to egress; no confirm within the grace
period means it was lost, e.g. with a killed egress). A message still waiting at a live worker has no
deadline, however slow the model: the watchdog's timeout and the heartbeat cover a stuck or dead worker. A
worker that reports itself idle on two heartbeats while messages sent to it are unanswered never got them
(lost with a dropped connection): they go again.

A worker that stops sending heartbeats is dead: its QoS 1 messages go again, one per frame (so a message
that kills workers is singled out), with attempt + 1; past `max_attempts` a message becomes a dead letter.
QoS 0 messages are never sent twice (at most once): a dead worker's QoS 0 messages are counted as dropped.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import zmq

from pipeline.telemetry.reporter import Reporter
from pipeline.telemetry.schema import RuleQueueLevels
from pipeline.wire import frames
from pipeline.wire.frames import Message, Result

if TYPE_CHECKING:  # pipeline.config.load loads pydantic; a stage gets its config from pipeline.config.snapshot
    from pipeline.config.load import Rule

log = logging.getLogger("pipeline.ingress.dispatch")  # a stable name for log filters, not the module path

BATCH = 32  # messages per frame at most
WORKER_SILENT = 2.5  # seconds without a heartbeat before a worker counts as dead
IDLE_AFTER = 1.0  # seconds after the last frame sent to a worker before its "I hold nothing" is believed
UNANSWERED = float("inf")  # the deadline of a message its worker has not answered yet


@dataclass
class Worker:
    """A worker of a rule as ingress sees it: its credit (frames it may still take), when it was last heard
    of, and the messages it holds, oldest first. Owned by one `RuleQueue`."""

    ident: bytes
    credit: int
    seen: float
    held: dict[str, Message] = field(default_factory=dict)  # QoS 1 messages it holds
    qos0: int = 0  # QoS 0 messages it holds (count only)
    reachable: bool = True  # False after a send found no connection to it (logged once)
    order: deque[str] = field(default_factory=deque)  # ids of messages sent and not answered, oldest first
    sent_at: float = 0.0  # when the last frame went to it
    idle_beats: int = 0  # consecutive heartbeats saying it holds nothing while `order` is not empty


class RuleQueue:
    """One rule's backlog and its workers: sends to workers with credit, tracks what each holds until egress
    confirms it, sends again what a dead worker held (attempt + 1) and turns messages past `max_attempts` into
    dead letters. Invariant: a QoS 1 message is in the backlog, at one worker, or awaiting its confirm; never two."""

    def __init__(self, rule: Rule, sock: zmq.Socket, stats: Reporter, dead_letter: Callable[[Result], None],
                 error_topic: Callable[[str], str]) -> None:
        self.rule, self.sock, self.stats = rule, sock, stats
        self.dead_letter, self.error_topic = dead_letter, error_topic
        self.pending: deque[Message] = deque()
        self.retry: deque[Message] = deque()  # suspects: sent one per frame
        self.workers: dict[bytes, Worker] = {}
        self.buried: deque[bytes] = deque(maxlen=1000)  # late credit or beats from these must not revive them
        self.in_flight: dict[str, tuple[Message, bytes, float]] = {}  # id -> (message, worker, deadline)
        self.grace = max(2.0 * rule.timeout, rule.timeout + 5.0)
        self._k = {k: f"{k}.{rule.name}" for k in ("dispatched", "dropped", "redispatched", "dead_letters")}

    def offer(self, msg: Message) -> None:
        """Queue a message; QoS 0 overflow follows the rule's policy (counted), QoS 1 is never dropped."""
        if msg.qos == 0 and len(self.pending) >= self.rule.backlog:
            self.stats.count(self._k["dropped"])
            if self.rule.overflow == "drop_new":
                return
            while self.pending and self.pending[0].qos == 1:  # drop the oldest QoS 0, keep QoS 1 order
                self.pending.rotate(-1)
            self.pending.popleft()
        self.pending.append(msg)

    def dispatch(self, now: float) -> None:
        if not (self.pending or self.retry):
            return
        # least loaded first: a light load spreads over the workers instead of queueing at the first one
        for w in sorted(self.workers.values(), key=lambda w: len(w.order)):
            while w.credit > 0 and (self.retry or self.pending):
                src = self.retry or self.pending  # suspects first, one per frame
                batch = [src.popleft()] if src is self.retry else self._take(min(w.credit, BATCH))
                if not self._send(w, batch, now):
                    src.extendleft(reversed(batch))  # never sent: no attempt used, QoS 0 ones included
                    break

    def _take(self, n: int) -> list[Message]:
        p = self.pending
        return [p.popleft() for _ in range(min(n, len(p)))]

    def _send(self, w: Worker, batch: list[Message], now: float) -> bool:
        try:
            self.sock.send_multipart([w.ident, frames.encode(batch)], zmq.NOBLOCK)
        except zmq.ZMQError:  # ROUTER_MANDATORY: no connection to that worker
            self._unreachable(w)
            return False
        w.credit -= len(batch)
        w.reachable, w.sent_at = True, now
        for m in batch:
            w.order.append(m.id)
            if self._tracked(m):
                w.held[m.id] = m
                self.in_flight[m.id] = (m, w.ident, UNANSWERED)
            else:
                w.qos0 += 1
        self.stats.count(self._k["dispatched"], len(batch))
        return True

    def _tracked(self, msg: Message) -> bool:
        """Whether `msg` is held (by id) until egress confirms it: QoS 1 ones; a QoS 0 one is only counted."""
        return msg.qos == 1

    @property
    def backlogged(self) -> bool:
        """Whether messages wait to be sent to a worker."""
        return bool(self.pending or self.retry)

    def clear_backlog(self) -> int:
        """Forget what waits to be sent (ingress stops: the broker sends the QoS 1 ones again); return how many
        QoS 0 messages that drops."""
        dropped = sum(1 for m in (*self.pending, *self.retry) if not m.qos)
        self.pending.clear()
        self.retry.clear()
        return dropped

    def _unreachable(self, w: Worker) -> None:
        """The ROUTER has no connection to `w`. It is not dead for that: a worker known from its heartbeats (after
        an ingress restart) may not have reconnected its DEALER yet. Its credit is void until its next heartbeat;
        a worker that is really gone stops beating, and `expire` buries it."""
        if w.reachable:
            log.info("worker %s of rule %s is not reachable yet: no credit until its next heartbeat",
                     w.ident.decode(), self.rule.name)
        w.credit, w.reachable = 0, False

    def on_credit(self, ident: bytes, n: int, now: float) -> None:
        w = self.workers.get(ident)
        if w is None and ident in self.buried:
            return
        if w is None:
            w = self.workers[ident] = Worker(ident, 0, now)
            log.info("worker %s of rule %s is up", ident.decode(), self.rule.name)
        w.seen = now
        w.qos0 = max(0, w.qos0 - n)  # QoS 0 messages it answered (credit returns count both kinds)
        self._answered(w, n, now)
        w.credit = min(w.credit + n, self._room(w))

    def _answered(self, w: Worker, n: int, now: float) -> None:
        """The n oldest messages sent to `w` are answered: their results are on the way to egress, and the
        grace period for their confirms starts now."""
        for _ in range(min(n, len(w.order))):
            entry = self.in_flight.get(w.order.popleft())
            if entry is not None and entry[1] == w.ident and entry[2] == UNANSWERED:
                self.in_flight[entry[0].id] = (entry[0], w.ident, now + self.grace)

    def on_beat(self, ident: bytes, free: int, now: float) -> None:
        """A heartbeat; `free` is the worker's own count of messages it could take now."""
        w = self.workers.get(ident)
        if w is None and ident in self.buried:
            return
        if w is None:  # a worker that knew an earlier ingress (restarted): start from what it says
            self.workers[ident] = Worker(ident, free, now)
            log.info("worker %s of rule %s reported in (room for %d)", ident.decode(), self.rule.name, free)
            return
        w.seen = now
        self._check_idle(w, free, now)
        # credit lost with an earlier ingress comes back: what the worker has room for, minus what we sent it
        w.credit = min(max(w.credit, free - len(w.held) - w.qos0), self._room(w))

    @staticmethod
    def _room(w: Worker) -> int:
        """The most credit `w` can have: PREFETCH less what was sent to it and not answered. Credit above it (a
        worker that reported room while frames of an earlier ingress still waited in its socket) would have it
        take more than PREFETCH at once."""
        return max(0, frames.PREFETCH - len(w.order))

    def _check_idle(self, w: Worker, free: int, now: float) -> None:
        """Two heartbeats saying `w` holds nothing, over a second after the last frame went to it, while
        messages sent to it are unanswered: they never reached it (a dropped connection loses what was in
        the pipe). They go again; QoS 0 ones are counted as dropped."""
        idle = free >= frames.PREFETCH and w.order and now - w.sent_at > IDLE_AFTER
        w.idle_beats = w.idle_beats + 1 if idle else 0
        if w.idle_beats < 2:
            return
        lost = [self.in_flight[i][0] for i in w.order if i in self.in_flight and self.in_flight[i][1] == w.ident]
        log.warning("worker %s of rule %s is idle but never answered %d message(s) sent to it: sending them again",
                    w.ident.decode(), self.rule.name, len(w.order))
        self.stats.count(self._k["dropped"], w.qos0)
        w.order.clear()
        w.qos0 = w.idle_beats = 0
        for m in lost:
            self._again(m, now, "lost on the way to a worker", "lost")

    def confirm(self, msg_id: str, state: bytes | None = None) -> None:
        """Egress has the result of `msg_id` safe (`state`: what it left of its key's state, for a keyed rule)."""
        entry = self.in_flight.pop(msg_id, None)
        if entry is not None:
            w = self.workers.get(entry[1])
            if w is not None:
                w.held.pop(msg_id, None)

    def hasten(self, deadline: float) -> None:
        """Egress (re)started: the results of answered messages went to the old one, and their confirms will
        not come. They go again from `deadline` on; messages still at workers keep waiting for theirs."""
        for msg_id, (m, ident, d) in list(self.in_flight.items()):
            if deadline < d < UNANSWERED:
                self.in_flight[msg_id] = (m, ident, deadline)

    def on_timeout(self, ident: bytes, msg_id: str | None, answered: list[str], now: float) -> None:
        """A worker's call of `msg_id` passed the timeout; `answered`: results it sent before dying. No `msg_id`:
        a handler_batch call of several passed it, so each message it held goes again alone, as a suspect."""
        entry = self.in_flight.get(msg_id) if msg_id is not None else None
        if entry is not None and entry[1] == ident:
            self._again(entry[0], now, f"timeout after {self.rule.timeout:g}s", "timeout")
        elif entry is not None:  # another worker holds it now (or the report is forged): not this one's to resend
            self.stats.count("stray_timeouts")
        w = self.workers.get(ident)
        if w is not None:
            for done in answered:  # their confirms are on the way; a finite deadline covers a lost one
                w.held.pop(done, None)
                entry = self.in_flight.get(done)
                if entry is not None and entry[1] == ident and entry[2] == UNANSWERED:
                    self.in_flight[done] = (entry[0], ident, now + self.grace)
            self._bury(w, now, suspects=msg_id is None)  # a known culprit: the others lose no attempt

    def expire(self, now: float) -> None:
        """Bury silent workers; send again what passed its deadline (lost in a pipe, e.g. egress restarted)."""
        for w in [w for w in self.workers.values() if now - w.seen > WORKER_SILENT]:
            log.warning("worker %s of rule %s is silent: taking back its %d message(s)", w.ident.decode(),
                        self.rule.name, len(w.held) + w.qos0)
            self._bury(w, now, suspects=True)
        for msg_id in [i for i, (_, _, d) in self.in_flight.items() if d < now]:
            self._again(self.in_flight[msg_id][0], now, "no result before the deadline", "lost")

    def _bury(self, w: Worker, now: float, suspects: bool) -> None:
        """Forget a dead worker. Its QoS 1 messages go again: as suspects (attempt + 1, one per frame) when
        it died without saying why, else as they were, at the head of the backlog."""
        self.workers.pop(w.ident, None)
        self.buried.append(w.ident)
        if w.qos0:
            self.stats.count(self._k["dropped"], w.qos0)
        held = [m for m in w.held.values() if m.id in self.in_flight]
        if not suspects:
            for m in held:
                del self.in_flight[m.id]
            self._requeue(held)
            self.stats.count(self._k["redispatched"], len(held))
            return
        for m in held:
            self._again(m, now, "worker died while holding it", "worker_died")

    def _requeue(self, msgs: list[Message]) -> None:
        """Put messages a worker never called back at the head of the backlog, as they were."""
        self.pending.extendleft(reversed(msgs))

    def _again(self, msg: Message, now: float, why: str, reason: str) -> None:
        """`msg` goes again with attempt + 1 (as a suspect), or as a dead letter past max_attempts."""
        entry = self.in_flight.pop(msg.id, None)
        if entry is not None and (w := self.workers.get(entry[1])) is not None:
            w.held.pop(msg.id, None)
        if msg.attempt >= self.rule.max_attempts:
            self.stats.count(self._k["dead_letters"])
            err = f"{why} (attempt {msg.attempt} of {self.rule.max_attempts})"
            self.dead_letter(frames.error_result(msg, self.error_topic(msg.topic), reason, err))
            self._dead(msg)
            return
        self.stats.count(self._k["redispatched"])
        self._retry(msg._replace(attempt=msg.attempt + 1))

    def _retry(self, msg: Message) -> None:
        """Queue a suspect: it goes before the backlog, alone in its frame."""
        self.retry.append(msg)

    def _dead(self, msg: Message) -> None:
        """`msg` became a dead letter (its error record is on the way to egress)."""

    @property
    def depth(self) -> int:
        return len(self.pending) + len(self.retry)

    @property
    def answered(self) -> int:
        """QoS 1 messages whose worker answered and whose result egress has not confirmed: results on their way
        to egress, or in it before its outbox commit."""
        return sum(1 for _, _, deadline in self.in_flight.values() if deadline < UNANSWERED)

    @property
    def at_workers(self) -> int:
        return sum(len(w.order) for w in self.workers.values())

    @property
    def holding(self) -> int:
        return sum(len(w.held) + w.qos0 for w in self.workers.values())

    def levels(self) -> RuleQueueLevels:
        """This queue in the stage's snapshot (`rules.<rule>`)."""
        return {"pending": self.depth, "in_flight": self.holding, "workers": len(self.workers),
                "at_workers": self.at_workers, "answered": self.answered}
