"""The egress stage: results from every worker -> MQTT, through the durable outbox.

A result of a QoS 1 message is written to the outbox (one SQLite transaction for the frames waiting) and only then
confirmed to ingress, which may then ack the input; the publisher hands outbox rows to paho oldest first
(at most WINDOW unacknowledged per broker) and deletes each row on its PUBACK. Results of QoS 0 messages
skip the outbox (at most once): published if the broker is connected, else dropped and counted. While the
outbox is full, egress stops taking results, which backs pressure up to the workers and ingress.
"""

from __future__ import annotations

import errno
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import zmq
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from pipeline import topics
from pipeline.errors import DecodeError
from pipeline.keyed import store
from pipeline.models import codec
from pipeline.stages.egress.outbox import STALE, Entry, Keyed, Outbox, Row
from pipeline.stages.egress.trials import Trials
from pipeline.telemetry.reporter import Reporter
from pipeline.telemetry.schema import OutboxLevels
from pipeline.wire import frames
from pipeline.wire.endpoints import Endpoints
from pipeline.wire.frames import Result
from pipeline.wire.mqtt import Hub, Link
from pipeline.wire.sockets import drain

if TYPE_CHECKING:  # pipeline.config.load loads pydantic; a stage gets its config from pipeline.config.snapshot
    from pipeline.config.load import Config, Rule

log = logging.getLogger("pipeline.egress.stage")  # a stable name for log filters, not the module path

WINDOW = 500  # outbox rows handed to paho and not yet PUBACKed, per broker
PACKET_OVERHEAD = 16  # bytes of a PUBLISH besides its topic and payload, at most (header, lengths, id, properties)
RECORD_OVERHEAD = 2048  # bytes of an error record besides its payload, at most (its fields, capped texts)


MAX_STRIKES = 3  # connections lost with one row the oldest unacknowledged (and, after the first, the only one sent)
PERMANENT = frozenset({0x87, 0x90, 0x95, 0x99, 0x9A, 0x9B})  # PUBACK reasons a retry would meet again
MAX_BACKOFF = 30.0  # seconds between sending a row the broker refused for now (0x97 quota exceeded...) at most
EXPIRY_SWEEP = 60.0  # seconds between two deletions of expired keyed states
EXPIRY_MARGIN = 60.0  # seconds past a state's expiry before it is deleted


def disk_full(e: sqlite3.OperationalError) -> bool:
    """Whether an SQLite error means the disk (or the file system's quota) is full: a write may work later."""
    code = getattr(e, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR)  # an extended code keeps its base
    return "full" in str(e) or "disk I/O" in str(e)


def publish_problem(topic: object, payload: bytes, broker: str, limit: int) -> str | None:
    """Why `broker` (taking packets of `limit` bytes at most) would refuse a PUBLISH of `payload` on `topic`."""
    problem = topics.publish_problem(topic)
    if problem is None and len(payload) + len(topic.encode()) + PACKET_OVERHEAD > limit:  # type: ignore[union-attr]
        problem = (f"the result is {len(payload)} bytes, over what broker {broker} takes ({limit} bytes: "
                   f"its Maximum Packet Size, or brokers.{broker}.max_packet_bytes)")
    return problem


def row_problem(row: Row, broker: str, max_packet: int) -> str | None:
    """Why a broker would refuse an outbox row, or None (rows written by an older version are checked too)."""
    if type(row.payload) is not bytes:
        return f"the payload is stored as {type(row.payload).__name__}, not bytes"
    return publish_problem(row.topic, row.payload, broker, max_packet)


def fixed_error_topic(rule: Rule) -> str:
    """The rule's error topic where egress must make a record itself (it has no input topic for {N})."""
    return rule.error_topic if "{" not in rule.error_topic else f"pipeline/errors/{rule.name}"


def _keyed(r: Result) -> Keyed | None:
    """The keyed part of a result of a keyed rule (None for another rule's)."""
    if r.key is None:
        return None
    return Keyed(r.rule, r.key, r.source_broker, r.source_mid, r.source_qos, r.message_id, r.digest, r.dup, r.state,
                 r.base)


@dataclass
class Stored:
    """A frame of results as the outbox takes it: its entries, the confirms to send once they are stored (a keyed
    result's with the index of its entry, whose answer it carries), and a keyed rule's QoS 0 publishes, made only
    once their state is stored (by entry index)."""

    entries: list[Entry] = field(default_factory=list)
    confirms: list[list] = field(default_factory=list)
    keyed_confirms: list[tuple[int, list]] = field(default_factory=list)
    direct: list[tuple[int, tuple]] = field(default_factory=list)

    def add(self, r: Result, keyed: Keyed | None, output: tuple | None, sender: str) -> None:
        """One result: `output` from `Egress._output` (an outbox row, a keyed QoS 0 publish, or None)."""
        row = output if output is not None and r.source_qos else None
        if row is not None or keyed is not None:
            self.entries.append(Entry(row, keyed))
        if keyed is not None and output is not None and not r.source_qos:
            self.direct.append((len(self.entries) - 1, output))
        if r.source_qos or keyed is not None:
            self.confirms.append([r.message_id, r.rule, r.source_broker, sender])
        if keyed is not None:
            self.keyed_confirms.append((len(self.entries) - 1, self.confirms[-1]))


def run(cfg: Config, eps: Endpoints, stop: threading.Event) -> None:
    """Serve until `stop` is set, then take what workers already sent and flush the outbox (up to 5 s)."""
    outbox = open_outbox(cfg, stop)
    if outbox is None:
        return
    egress = Egress(cfg, eps, outbox)
    try:
        egress.serve(stop)
        egress.finish(time.monotonic() + 5.0)
    finally:
        egress.close()


def open_outbox(cfg: Config, stop: threading.Event) -> Outbox | None:
    """The outbox, opened once the disk lets SQLite create its files (a full disk: retried every second, so
    egress waits rather than failing into FATAL; it takes no result meanwhile); None when asked to stop."""
    path = store.path_in(cfg.default_data_dir())
    said = False
    while not stop.is_set():
        try:
            return Outbox(path, cfg.outbox.max_bytes, cfg.outbox.synchronous)
        except (sqlite3.OperationalError, OSError) as e:
            if not (disk_full(e) if isinstance(e, sqlite3.OperationalError) else e.errno == errno.ENOSPC):
                raise
            if not said:
                log.error("cannot open the outbox %s: %s (disk full?); retrying every second", path, e)
                said = True
            stop.wait(1.0)
    return None


class Egress:
    """The egress stage: takes results from every worker (and ingress's error records), checks them, stores
    QoS 1 ones in the outbox and confirms them to ingress, and publishes through one Publisher per broker."""

    def __init__(self, cfg: Config, eps: Endpoints, outbox: Outbox) -> None:
        ctx = zmq.Context.instance()
        self.cfg, self.stats = cfg, Reporter.connect(eps, "egress")
        self.guard = eps.guard(ctx)  # lets authorized remote workers in (endpoints.remote), else None
        self.pull = eps.bind(ctx, zmq.PULL, "results")
        self.confirm = eps.connect(ctx, zmq.PUSH, "confirms", options={zmq.LINGER: 2000})
        self.confirm.send(frames.pack([]))  # "egress started": ingress need not wait out its grace period
        self.outbox = outbox
        names = sorted({r.pub.broker for r in cfg.rules})
        self.links = {n: Link(n, cfg.brokers[n], f"{cfg.instance}-egress-{n}") for n in names}
        self.routes = {r.name: (r.pub.broker, r.pub.qos, r.pub.retain) for r in cfg.rules}
        self.sources = {r.sub.broker for r in cfg.rules}
        self.error_topics = {r.name: fixed_error_topic(r) for r in cfg.rules}
        self.publisher = {n: Publisher(link, self.outbox, cfg.outbox.drain_rate, self.stats, self.error_topics)
                          for n, link in self.links.items()}
        self.hub = Hub(list(self.links.values()))
        self.hub.register(self.pull)
        self.reading = True
        self.unstored: list[Stored] = []  # frames not written: the disk is full
        self.store_retry_at = 0.0
        self.expire_after = {r.name: r.state.expire_after for r in cfg.rules if r.key is not None}
        self.state_limits = {r.name: int(r.state.max_bytes) for r in cfg.rules if r.key is not None}
        self.expire_at = 0.0  # monotonic time of the next sweep of expired states
        self.trials = Trials(cfg, eps.run_dir, self.stats)
        g = self.stats.gauges
        g["brokers"] = lambda: {n: lk.state for n, lk in self.links.items()}
        g["protocols"] = lambda: {n: lk.chosen for n, lk in self.links.items() if lk.chosen}
        g["outbox"] = self._outbox_levels
        if self.outbox.rows:
            log.info("outbox holds %d result(s) from an earlier run: publishing them first", self.outbox.rows)

    def _outbox_levels(self) -> OutboxLevels:
        """The outbox in the stage's snapshot (`outbox`)."""
        o = self.outbox
        return {"rows": o.rows, "bytes": o.bytes, "full": o.full, "set_aside": o.set_aside_rows,
                "set_aside_last": o.set_aside_last, "disk_full": bool(self.unstored)}

    def serve(self, stop: threading.Event) -> None:
        log.info("egress up: publishing to %d broker(s), outbox %s", len(self.links), self.outbox.path)
        while not stop.is_set():
            self._backpressure()
            if self.pull in self.hub.poll(50):
                self._take_frames()
            self.step()

    def step(self) -> None:
        for p in self.publisher.values():
            p.pump()
        self.hub.flush()
        self.trials.tick(time.monotonic())
        if self.expire_after and time.monotonic() >= self.expire_at and not self.unstored:
            self._expire_states()
        self.stats.tick()

    def _expire_states(self) -> None:
        """Delete the keyed states nobody wrote for their rule's `state.expire_after` (ingress and control count
        them as empty already; EXPIRY_MARGIN later, so that a state ingress still holds is never deleted)."""
        self.expire_at = time.monotonic() + EXPIRY_SWEEP
        try:
            gone = self.outbox.expire_states(self.expire_after, EXPIRY_MARGIN)
        except sqlite3.OperationalError as e:
            if not disk_full(e):
                raise
            return
        if gone:
            self.stats.count("states_expired", gone)

    def _backpressure(self) -> None:
        """Stop taking results while the outbox is full or cannot be written (disk full): workers then keep
        their results, ingress its messages, and the broker the input it was not acknowledged."""
        if self.unstored and time.monotonic() >= self.store_retry_at:
            self._retry_store()
        blocked = self.outbox.full or bool(self.unstored)
        if self.reading and blocked:
            if self.outbox.full:
                log.warning("outbox full (%d bytes): not taking results until it drains", self.outbox.bytes)
            self.hub.unregister(self.pull)
        elif not self.reading and not blocked:
            self.hub.register(self.pull)
        self.reading = not blocked

    def _store(self, frame: Stored) -> None:
        """Write a frame's results to the outbox, then publish its keyed QoS 0 results and confirm them all (a keyed
        one with what it left of its key's state); when the disk is full, keep them (in order) until a write
        succeeds again, and confirm nothing meanwhile."""
        if self.unstored:
            self.unstored.append(frame)
            return
        try:
            done = self.outbox.commit(frame.entries)
        except sqlite3.OperationalError as e:
            if not disk_full(e):
                raise
            self.unstored.append(frame)
            self.store_retry_at = time.monotonic() + 1.0
            self.stats.reject("disk_full", f"outbox {self.outbox.path}: {e}; results wait, nothing is confirmed")
            return
        counts = {"already_done": done.recognised,  # delivered again: their first result is stored
                  "stale_results": done.stale,  # computed from a state written since: ingress sends them again
                  "state_writes": done.state_writes}
        for name, n in counts.items():
            if n:
                self.stats.count(name, n)
        for i, (broker, topic, payload, qos, retain) in frame.direct:
            if done.states[i] is not STALE:
                self.publisher[broker].direct(topic, payload, qos, retain)
        for i, c in frame.keyed_confirms:
            c.append(done.states[i])
        if frame.confirms:
            self.confirm.send(frames.pack(frame.confirms))

    def _retry_store(self) -> None:
        waiting, self.unstored = self.unstored, []
        for i, frame in enumerate(waiting):
            self._store(frame)
            if self.unstored:  # still full: the rest waits behind it, in order
                self.unstored += waiting[i + 1:]
                return
        log.info("the outbox takes writes again: %d frame(s) of results stored", len(waiting))

    def _take_frames(self) -> None:
        """Every frame waiting (up to 64), stored in one outbox transaction: one commit, one fsync, for all."""
        stored = Stored()
        for frame in drain(self.pull, 64):
            try:
                results, sender = frames.decode_from(frame, Result)
            except DecodeError as e:
                self.stats.reject("bad_frames", f"results: {e}")
                continue
            self.take(results, sender, stored)
        if stored.entries or stored.confirms:
            self._store(stored)

    def _problem(self, r: Result) -> str | None:
        """Why a decoded result cannot be acted on at all (dropped and not confirmed), or None."""
        problem = frames.result_problem(r)
        if problem is None and r.rule not in self.routes:
            problem = f"no rule named {r.rule!r:.80}"
        if problem is None and r.source_qos and r.source_broker not in self.sources:
            problem = f"no input broker named {r.source_broker!r:.80}"
        if problem is None and r.key is not None:
            problem = self._keyed_problem(r)
        return problem

    def _keyed_problem(self, r: Result) -> str | None:
        """Why a result with a key cannot be acted on: its rule has no key, or its state passes the rule's bound."""
        limit = self.state_limits.get(r.rule)
        if limit is None:
            return f"a key for rule {r.rule!r:.80}, which has no key:"
        if r.state is not None and len(r.state) > limit:
            return f"a state of {len(r.state)} bytes for rule {r.rule!r:.80}, over its state.max_bytes ({limit})"
        return None

    def _publishable(self, r: Result, broker: str) -> Result | None:
        """`r`, or the error record that replaces it when its broker would refuse it (a topic that is not a
        valid topic name, a packet over the broker's limit); None when even that record cannot be sent."""
        limit = self.links[broker].max_packet
        problem = publish_problem(r.topic, r.payload, broker, limit)
        if problem is None:
            return r
        self.stats.reject("unpublishable", f"rule {r.rule}: {problem}")
        topic = self.error_topics[r.rule]
        overhead = PACKET_OVERHEAD + len(topic.encode())
        if r.kind == frames.ERROR:  # an error record already: to the rule's fixed error topic, cut to fit
            record = codec.shrink_record(r.payload, limit - overhead)
            fits = record is not None
            if fits:
                r = r._replace(payload=record)
        else:
            record = codec.error_record(rule=r.rule, topic=r.topic[:1000].encode("utf-8", "replace").decode(),
                                        reason="unpublishable_result", error=problem, message_id=r.message_id,
                                        payload=r.payload, max_payload=max(0, limit - overhead - RECORD_OVERHEAD))
            r = r._replace(kind=frames.ERROR, payload=record)
            fits = len(record) + overhead <= limit
        if not fits:
            self.stats.count("unpublishable_dropped")  # nothing this broker takes can be sent for it: counted
            return None
        return r._replace(topic=topic)

    def take(self, results: list[Result], sender: str, frame: Stored) -> None:
        """Publish the QoS 0 results of one frame and add the others to `frame`, which `_store` writes to the outbox
        (QoS 1 rows, a keyed rule's states) before confirming them to ingress, naming `sender`, the worker that sent
        them, which ingress checks against the one holding each."""
        now = time.monotonic()
        for r in results:
            problem = self._problem(r)
            if problem is not None:
                self.stats.reject("bad_results", f"a result dropped, not confirmed: {problem}")
                continue
            self.stats.count("received")
            self.stats.count("received." + r.rule)
            self.stats.observe("end_to_end." + r.rule, time.time() - r.received_at)
            self.trials.see(r, now)
            frame.add(r, _keyed(r) if sender else None, self._output(r), sender)  # "": ingress's own error records

    def _output(self, r: Result) -> tuple | None:
        """What to publish of a result: an outbox row (QoS 1 input), a publish to make now (QoS 0 input; `Stored`
        makes a keyed rule's once its state is stored), or None (the model returned None, or nothing the broker
        takes can be made of it)."""
        if r.kind == frames.NOTHING:
            self.stats.count("nothing")
            return None
        broker, qos, retain = self.routes[r.rule]
        sendable = self._publishable(r, broker)
        if sendable is None:
            return None
        r = sendable
        self.stats.count("error_records" if r.kind == frames.ERROR else "results")
        retain = int(retain and r.kind == frames.PUBLISH)
        if r.source_qos:
            return (broker, r.topic, r.payload, qos, retain, r.rule, r.received_at)
        if r.key is None:
            self.publisher[broker].direct(r.topic, r.payload, qos, retain)
            return None
        return (broker, r.topic, r.payload, qos, retain)

    def finish(self, deadline: float) -> None:
        while self.pull.poll(300):
            self._take_frames()
        while time.monotonic() < deadline and any(p.busy for p in self.publisher.values()):
            self.hub.poll(20)
            self.step()
        if self.outbox.rows:
            log.warning("stopping with %d result(s) in the outbox: they go out at the next start", self.outbox.rows)

    def close(self) -> None:
        for link in self.links.values():
            link.stop()
        self.stats.close()
        self.pull.close(linger=0)
        self.confirm.close()
        self.outbox.close()
        if self.guard is not None:
            self.guard.stop()


class Publisher:
    """Moves one broker's outbox rows to paho, oldest first, and deletes them on PUBACK.

    A row the broker will never take (checked before it is handed, refused by a PUBACK reason that will not
    change, or the oldest unacknowledged row each time the broker closed the connection, MAX_STRIKES times in
    a row) is set aside with an error record on its rule's error topic, so it never blocks the rows behind it.
    A PUBACK reason that may change (quota exceeded...) sends the row again after a backoff."""

    def __init__(self, link: Link, outbox: Outbox, drain_rate: int, stats: Reporter,
                 error_topics: dict[str, str]) -> None:
        self.link, self.outbox, self.rate, self.stats = link, outbox, drain_rate, stats
        self.error_topics = error_topics
        self.refused: list[tuple[int, int, str]] = []  # (row id, payload length, why): set aside at the next pump
        self.again: list[tuple[int, int]] = []  # (row id, payload length) refused for now: handed again later
        self.retry_at = 0.0  # monotonic time before which nothing is handed (after a transient refusal)
        self.backoff = 0.0
        self.strikes: dict[int, int] = {}  # row id -> connections lost while it was the oldest unacknowledged
        self.suspect: int | None = None  # the row struck last, until it is acknowledged or set aside
        self.cursor = 0  # highest row id handed to paho
        self.sent: dict[int, tuple[int, int]] = {}  # paho mid -> (row id, payload length)
        self.acked: list[tuple[int, int]] = []  # PUBACKed rows, deleted in one transaction per pump
        self.catch_up_until = 0  # while cursor < this, hand rows at no more than drain_rate per second
        self.tokens, self.t = 0.0, time.monotonic()
        self.refusals: set[int] = set()  # PUBACK failure reasons logged so far
        link.client.on_puback = self._on_puback  # QoS 1 rows go out with publish1: paho never tracks them
        link.on_connected = self._connected

    @property
    def busy(self) -> bool:
        pending = self.sent or self.acked or self.outbox.after(self.link.name, self.cursor, 1)
        return self.link.connected and bool(pending)

    def _connected(self, _link: Link) -> None:
        self._delete_acked()
        if self.sent:
            self._strike(min(self.sent.values()))
        unacked = [row for row, _ in (*self.sent.values(), *self.again)]
        if unacked:  # handed on the lost connection and never acknowledged: again, from the outbox
            self.cursor = min(unacked) - 1
            self.sent.clear()
            self.again.clear()
        if self.outbox.after(self.link.name, self.cursor, 1):
            self.catch_up_until = self.outbox.db.execute("SELECT max(id) FROM outbox").fetchone()[0]
            log.info("broker %s is back: catching up on the outbox at %d msg/s at most", self.link.name, self.rate)

    def _strike(self, oldest: tuple[int, int]) -> None:
        """The connection was lost with `oldest` (row id, length) the oldest unacknowledged row: it becomes the
        suspect, and rows go one at a time until it is acknowledged (then it was innocent: the broker had not
        sent the PUBACKs before it closed) or struck MAX_STRIKES times (then it is set aside)."""
        n = self.strikes[oldest[0]] = self.strikes.get(oldest[0], 0) + 1
        self.suspect = oldest[0]
        if n >= MAX_STRIKES:
            del self.strikes[oldest[0]]
            self.suspect = None
            self.refused.append((*oldest, f"broker {self.link.name} closed the connection each of the {n} times "
                                 "it was sent"))

    def pump(self) -> None:
        self._delete_acked()
        self._set_aside()
        if not self.link.connected or self.outbox.rows == 0 or time.monotonic() < self.retry_at:
            return
        if self.again:
            rows = self.outbox.by_id([row for row, _ in self.again])
            self.again.clear()
            for i, row in enumerate(rows):
                if not self._hand(row, [], advance=False):  # the connection went: the rest goes later
                    self.again = [(r.id, len(r.payload)) for r in rows[i:]]
                    break
        room = (1 if self.suspect is not None else WINDOW) - len(self.sent)  # after a strike: one at a time
        if self.cursor < self.catch_up_until:
            now = time.monotonic()
            self.tokens = min(self.tokens + (now - self.t) * self.rate, float(self.rate))
            self.t = now
            room = min(room, int(self.tokens))
        if room <= 0:
            return
        rows = self.outbox.after(self.link.name, self.cursor, room)
        self.tokens -= len(rows)
        done: list[tuple[int, int]] = []
        for row in rows:
            if not self._hand(row, done):
                break  # the connection went (the caller saw it up): the rest waits for the reconnect
        if done and not self._delete(done):
            self.acked += done

    def _delete(self, rows: list[tuple[int, int]]) -> bool:
        """Delete published rows; False when the disk is full (they stay, and are deleted later)."""
        try:
            self.outbox.delete(rows)
        except sqlite3.OperationalError as e:
            if not disk_full(e):
                raise
            self.stats.reject("disk_full", f"outbox {self.outbox.path}: {e}; published rows are deleted later")
            return False
        self.stats.count("published", len(rows))
        return True

    def _delete_acked(self) -> None:
        if self.acked and self._delete(self.acked):
            self.acked = []

    def _set_aside(self) -> None:
        """Move the rows refused so far to the set_aside table, each with an error record (a row on its rule's
        error topic gets none: no record of a record)."""
        while self.refused:
            row_id, size, why = self.refused[0]
            found = self.outbox.by_id([row_id], with_rule=True)
            if found:
                try:
                    self.outbox.set_aside(row_id, size, why, self._record_of(*found[0], why))
                except sqlite3.OperationalError as e:
                    if not disk_full(e):
                        raise
                    self.stats.reject("disk_full", f"outbox {self.outbox.path}: {e}; rows are set aside later")
                    return  # this one and the rest wait for space (the row stays in the outbox meanwhile)
                self.stats.reject("set_aside", f"broker {self.link.name}, outbox row {row_id}: {why}")
            self.refused.pop(0)

    def _record_of(self, row: Row, rule: str, why: str) -> tuple | None:
        """The outbox row of the error record for a row set aside; None for a row on its rule's error topic."""
        topic = self.error_topics.get(rule)
        if topic is None or topic == row.topic:
            return None
        payload = row.payload if type(row.payload) is bytes else str(row.payload).encode("utf-8", "replace")
        shown = str(row.topic)[:1000].encode("utf-8", "replace").decode()
        body = codec.error_record(rule=rule, topic=shown, reason="set_aside", error=why,
                                  message_id=f"outbox-{row.id}", payload=payload, max_payload=1024)
        return (self.link.name, topic, body, 1, 0, rule, time.time())

    def _hand(self, row: Row, done: list[tuple[int, int]], advance: bool = True) -> bool:
        """Write one row into the send buffer; QoS 0 rows are done at once (no PUBACK to wait for). A row the
        broker would refuse (not a topic name, not bytes, over its packet size) is set aside instead."""
        c = self.link.client
        why = row_problem(row, self.link.name, self.link.max_packet)
        if why is not None:
            self.refused.append((row.id, len(row.payload or b""), why))
        elif row.qos == 0:
            if not c.publish0(row.topic, row.payload, bool(row.retain)):
                return False
            done.append((row.id, len(row.payload)))
        else:
            mid = c.publish1(row.topic, row.payload, bool(row.retain))
            if not mid:
                return False
            self.sent[mid] = (row.id, len(row.payload))
        if advance:
            self.cursor = row.id
        return True

    def _on_puback(self, mid: int, reason: int) -> None:
        entry = self.sent.pop(mid, None)
        if reason >= 0x80:
            self._refused(reason, entry)
        if entry is None:
            return
        if reason < 0x80:
            self.acked.append(entry)
            if self.strikes and self.strikes.pop(entry[0], None) is not None and self.suspect == entry[0]:
                self.suspect = None
            self.backoff = 0.0
        elif reason in PERMANENT:
            self.refused.append((*entry, f"broker {self.link.name} refused it (PUBACK 0x{reason:02x})"))
        else:  # quota exceeded, unspecified...: the same row again, after a pause for everything
            self.stats.count("refused_transient")
            self.again.append(entry)
            now = time.monotonic()
            if now >= self.retry_at:  # the first refusal since the last pause: a longer pause (one per burst)
                self.backoff = min(max(2 * self.backoff, 1.0), MAX_BACKOFF)
                self.retry_at = now + self.backoff

    def _refused(self, reason: int, entry: tuple[int, int] | None) -> None:
        """An MQTT 5 PUBACK with a failure reason (0x87 not authorized, 0x90 topic name invalid, 0x97 quota
        exceeded...): the broker did not take the message. Counted as `refused`, and logged once per reason."""
        self.stats.count("refused")
        if reason not in self.refusals:
            self.refusals.add(reason)
            try:
                name = str(ReasonCode(PacketTypes.PUBACK, identifier=reason))
            except ValueError:  # a code MQTT 5 does not define for PUBACK
                name = "unknown reason"
            log.error("broker %s refused a result (PUBACK 0x%02x %s%s); counted in refused, logged once per reason",
                      self.link.name, reason, name, f", outbox row {entry[0]}" if entry else "")

    def direct(self, topic: str, payload: bytes, qos: int, retain: int) -> None:
        """A result of a QoS 0 message: published now if connected, else dropped (counted)."""
        if not self.link.connected:
            self.stats.count("dropped")
            return
        if qos == 0:
            sent = self.link.client.publish0(topic, payload, bool(retain))
        else:
            sent = self.link.client.publish1(topic, payload, bool(retain)) != 0  # its PUBACK is not awaited
        self.stats.count("published" if sent else "dropped")
