"""Dispatch for a keyed rule: one message of a key in flight at a time, on the worker the key sticks to.

Invariants, besides `RuleQueue`'s:
- A key has at most one message sent and not settled. Settled means: egress confirmed its result (then the state
  it left is known), it became a dead letter, or (QoS 0) it was lost and counted as dropped. Only then does the
  key's next message go, so a key's calls, and the results egress stores, follow the arrival order; a message
  sent again (worker died, result lost, timeout) stays at the head of its key.
- The next message carries the key's state as committed: the confirm's state, or, when that is not known here
  (first use, after a settle without a confirm, after ingress restarted), the state read from egress's file.
- A key sticks to the worker that took its first message while that worker lives; a dead worker's keys go to the
  least loaded live one. Keys never wait behind other keys: each worker takes its own ready keys first, then
  keys without a live worker, and a key whose worker has no credit waits for that worker only.
- QoS 0 messages of a keyed rule are held until confirmed too (their state is committed), but never sent again.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq

from pipeline.keyed import keys, store
from pipeline.models import codec
from pipeline.stages.ingress.dispatch import BATCH, UNANSWERED, RuleQueue, Worker
from pipeline.telemetry.reporter import Reporter
from pipeline.telemetry.schema import RuleQueueLevels
from pipeline.wire.frames import Message, Result

if TYPE_CHECKING:  # pipeline.config.load loads pydantic; a stage gets its config from pipeline.config.snapshot
    from pipeline.config.load import Rule

log = logging.getLogger("pipeline.ingress.keyed")  # a stable name for log filters, not the module path

KNOWN_KEYS = 100_000  # keys whose worker and state are remembered while idle (the least recently used go first)


def key_value(parts: tuple[keys.Part, ...], topic: str, payload: bytes, memo: list[Any]) -> str:
    """The key value `parts` give a message; raise keys.NoKey, or codec.BadPayload when a part reads a payload that
    is not JSON. `memo` holds the payload decoded (or the BadPayload it raised) once per message, for every rule
    that reads a key from it."""
    def event() -> Any:
        if not memo:
            try:
                memo.append(codec.decode_event(payload))
            except codec.BadPayload as e:
                memo.append(e)
        if isinstance(memo[0], codec.BadPayload):
            raise memo[0]
        return memo[0]
    return keys.key_of(parts, topic, event)


class StateReader:
    """Reads committed states from egress's file (read-only), opened at the first read that finds the file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.db: sqlite3.Connection | None = None

    def read(self, rule: str, key: str) -> store.Stored | None:
        """The stored state of (rule, key); None when there is none (or no file yet). Raises sqlite3.Error."""
        if self.db is None:
            self.db = store.read_only(self.path)
            if self.db is None:
                return None
        return store.read(self.db, rule, key)

    def close(self) -> None:
        if self.db is not None:
            self.db.close()


@dataclass
class KeyLine:
    """One key's messages at ingress: those waiting, oldest first, and the id of the one sent and not settled."""

    waiting: deque[Message] = field(default_factory=deque)
    busy: str | None = None
    suspect: bool = False  # its head went again after a worker died: it goes alone in a frame


@dataclass
class Known:
    """What ingress remembers of a key between its messages: its worker and its committed state (None: read it
    from the file at the next send)."""

    owner: bytes | None = None
    state: store.Stored | None = None


class KeyedQueue(RuleQueue):
    """A keyed rule's backlog: per-key lines, the keys ready to send (per worker and without a worker), what is
    known of each key. See the module docstring for the invariants."""

    def __init__(self, rule: Rule, sock: zmq.Socket, stats: Reporter, dead_letter: Callable[[Result], None],
                 error_topic: Callable[[str], str], states: StateReader) -> None:
        super().__init__(rule, sock, stats, dead_letter, error_topic)
        self.parts = keys.parse(rule.key)
        self.reads_payload = keys.needs_event(self.parts)
        self.states = states
        self.lines: dict[str, KeyLine] = {}
        self.free: deque[str] = deque()  # ready keys without a live worker, in the order they became ready
        self.mine: dict[bytes, deque[str]] = {}  # worker -> its ready keys, in the order they became ready
        self.known: OrderedDict[str, Known] = OrderedDict()
        self.waiting = 0  # messages in the lines, not sent

    def key_of(self, topic: str, payload: bytes, memo: list[Any]) -> str:
        """The message's key value (`memo`: the payload decoded by an earlier keyed rule, shared per message);
        the rule's key_default when it has none; raise keys.NoKey (or codec.BadPayload, when the key is read from
        a payload that is not JSON) when there is no default either."""
        try:
            return key_value(self.parts, topic, payload, memo)
        except (keys.NoKey, codec.BadPayload):
            if self.rule.key_default is None:
                raise
            return self.rule.key_default

    def _tracked(self, msg: Message) -> bool:
        return True

    def offer(self, msg: Message) -> None:
        """Queue a message behind its key's; QoS 0 beyond the backlog is dropped (the newest: counted)."""
        if msg.qos == 0 and self.waiting >= self.rule.backlog:
            self.stats.count(self._k["dropped"])
            return
        key = msg.key or ""
        line = self.lines.get(key)
        if line is None:
            line = self.lines[key] = KeyLine()
        line.waiting.append(msg)
        self.waiting += 1
        if line.busy is None and len(line.waiting) == 1:
            self._ready(key)

    def _ready(self, key: str, first: bool = False) -> None:
        """`key` has a message to send and none in flight: it waits for its worker, or for any when it has none."""
        known = self.known.get(key)
        owner = known.owner if known is not None else None
        queue = self.mine.setdefault(owner, deque()) if owner is not None and owner in self.workers else self.free
        if first:
            queue.appendleft(key)
        else:
            queue.append(key)

    @property
    def backlogged(self) -> bool:
        """Whether a key could be sent now (a hot key waiting for its own result is not a backlog)."""
        return bool(self.free) or any(self.mine.get(i) for i in self.workers)

    @property
    def depth(self) -> int:
        return self.waiting

    def clear_backlog(self) -> int:
        dropped = 0
        for key, line in list(self.lines.items()):
            dropped += sum(1 for m in line.waiting if not m.qos)
            line.waiting.clear()
            if line.busy is None:
                del self.lines[key]
        self.free.clear()
        for queue in self.mine.values():
            queue.clear()
        self.waiting = 0
        return dropped

    def dispatch(self, now: float) -> None:
        if not self.waiting:
            return
        for w in sorted(self.workers.values(), key=lambda w: len(w.order)):
            if w.credit > 0 and not self._fill(w, now):
                return  # the state file cannot be read now: the next turn tries again

    def _fill(self, w: Worker, now: float) -> bool:
        """Send `w` the heads of its ready keys, then of keys without a worker, as far as its credit goes; a suspect
        goes alone. False when a state could not be read (nothing is lost: the key stays ready)."""
        own = self.mine.setdefault(w.ident, deque())
        batch: list[Message] = []
        while w.credit > len(batch) and (own or self.free):
            src = own if own else self.free
            key = src.popleft()
            try:
                msg = self._take_head(key, w)
            except sqlite3.Error as e:
                src.appendleft(key)
                self.stats.reject("state_unreadable", f"rule {self.rule.name}: reading key {key!r:.80}: {e}")
                self._send_or_put_back(w, batch, now)
                return False
            if self.lines[key].suspect:
                self.lines[key].suspect = False
                if not self._send_or_put_back(w, [msg], now, suspect=True):
                    break
                continue
            batch.append(msg)
            if len(batch) == BATCH:
                sent = self._send_or_put_back(w, batch, now)
                batch = []
                if not sent:
                    return True
        self._send_or_put_back(w, batch, now)
        return True

    def _take_head(self, key: str, w: Worker) -> Message:
        """The head of `key`'s line, now in flight at `w`, with the key's committed state."""
        known = self.known.get(key)
        if known is None:
            known = self.known[key] = Known()
            if len(self.known) > KNOWN_KEYS:
                self._forget_idle()
        self.known.move_to_end(key)
        if known.state is None:
            known.state = self.states.read(self.rule.name, key) or store.NONE
        line = self.lines[key]
        msg = line.waiting.popleft()
        self.waiting -= 1
        line.busy = msg.id
        state = store.current(known.state, self.rule.state.expire_after)
        return msg._replace(key=key, state=state, base=known.state.version)

    def _forget_idle(self) -> None:
        """Forget the least recently used keys that have nothing here (their state is read again when needed); a
        key with messages here is kept, as the most recently used."""
        for _ in range(len(self.known) - KNOWN_KEYS):
            key, known = self.known.popitem(last=False)
            if key in self.lines:
                self.known[key] = known

    def _send_or_put_back(self, w: Worker, batch: list[Message], now: float, suspect: bool = False) -> bool:
        """Send `batch` to `w`, which its keys then stick to; when it cannot be (no connection to it), put each
        message back at the head of its key (a suspect stays one), and its key at the head of the ready keys."""
        if not batch:
            return True
        if self._send(w, batch, now):
            for msg in batch:
                self.known[msg.key or ""].owner = w.ident
            return True
        for msg in reversed(batch):
            line = self.lines[msg.key or ""]
            line.waiting.appendleft(msg)
            line.busy = None
            line.suspect = suspect
            self.waiting += 1
            self._ready(msg.key or "", first=True)
        return False

    def confirm(self, msg_id: str, state: tuple[bytes, int] | None = None) -> None:
        """Egress has the result of `msg_id` safe; `state`: the key's state as stored (value, version), None when the
        call left it unchanged."""
        entry = self.in_flight.get(msg_id)
        super().confirm(msg_id)
        if entry is None:
            return
        key = entry[0].key or ""
        known = self.known.get(key)
        if known is not None and state is not None:
            known.state = store.Stored(state[0], time.time(), state[1])
        self._settle(key, msg_id)

    def again_stale(self, msg_id: str) -> None:
        """Egress did not store the result of `msg_id`: it was computed from a state written since (a late result
        of a message this key sent again). The message goes again, as it was, after its key's state is read."""
        entry = self.in_flight.get(msg_id)
        super().confirm(msg_id)
        if entry is None:
            return
        msg = entry[0]
        self.stats.count(f"stale.{self.rule.name}")
        self._requeue([msg])

    def _settle(self, key: str, msg_id: str) -> None:
        """The message `msg_id` of `key` is done with: the key's next message may go."""
        line = self.lines.get(key)
        if line is None or line.busy != msg_id:
            return
        line.busy = None
        if line.waiting:
            self._ready(key, first=line.suspect)
        else:
            del self.lines[key]

    def _unknown_state(self, key: str) -> None:
        """The key's message settled without a confirm: its state is read from the file again before the next."""
        known = self.known.get(key)
        if known is not None:
            known.state = None

    def _requeue(self, msgs: list[Message]) -> None:
        for msg in reversed(msgs):
            key = msg.key or ""
            line = self.lines.setdefault(key, KeyLine())
            line.waiting.appendleft(msg)
            line.busy = None
            self.waiting += 1
            self._unknown_state(key)
            self._ready(key, first=True)

    def _again(self, msg: Message, now: float, why: str, reason: str) -> None:
        """As for any rule, but the message stays at the head of its key (`_retry`); a QoS 0 one is dropped
        (counted) and its key goes on. Either way the key's state is read again before its next message: the
        result may have been stored without its confirm reaching here."""
        key = msg.key or ""
        self._unknown_state(key)
        if msg.qos == 1:
            super()._again(msg, now, why, reason)
            return
        entry = self.in_flight.pop(msg.id, None)
        if entry is not None and (w := self.workers.get(entry[1])) is not None:
            w.held.pop(msg.id, None)
        self.stats.count(self._k["dropped"])
        self._settle(key, msg.id)

    def _retry(self, msg: Message) -> None:
        key = msg.key or ""
        line = self.lines[key]
        line.busy = None
        line.suspect = True
        line.waiting.appendleft(msg)
        self.waiting += 1
        self._ready(key, first=True)

    def _dead(self, msg: Message) -> None:
        self._settle(msg.key or "", msg.id)

    def _taken_back(self, w: Worker) -> list[Message]:
        """Only the messages `w` had not answered: an answered one's result is on the way to egress, and sent again
        its second call would start from the state the first one stored (a QoS 0 message has no done row to tell
        it). It keeps its deadline; the confirm naming `w` is accepted."""
        return [m for m in w.held.values() if self.in_flight.get(m.id, (None, None, 0.0))[2] == UNANSWERED]

    def _bury(self, w: Worker, now: float, suspects: bool) -> None:
        super()._bury(w, now, suspects)
        orphans = self.mine.pop(w.ident, deque())
        self.free.extend(orphans)

    def levels(self) -> RuleQueueLevels:
        levels = super().levels()
        levels["keys"] = len(self.lines)
        return levels
