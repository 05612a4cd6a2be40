"""The egress stage: results from every worker -> MQTT, through the durable outbox.

A result of a QoS 1 message is written to the outbox (one SQLite transaction per frame) and only then
confirmed to ingress, which may then ack the input; the publisher hands outbox rows to paho oldest first
(at most WINDOW unacknowledged per broker) and deletes each row on its PUBACK. Results of QoS 0 messages
skip the outbox (at most once): published if the broker is connected, else dropped and counted. While the
outbox is full, egress stops taking results, which backs pressure up to the workers and ingress.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

import zmq
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from pipeline import envelope
from pipeline.egress.outbox import Outbox, Row
from pipeline.endpoints import Endpoints
from pipeline.envelope import Result
from pipeline.mqtt import Hub, Link
from pipeline.sockets import drain
from pipeline.stats import Reporter

if TYPE_CHECKING:  # pipeline.config loads pydantic; a stage gets its config from pipeline.frozen
    from pipeline.config import Config

log = logging.getLogger(__name__)

WINDOW = 500  # outbox rows handed to paho and not yet PUBACKed, per broker


def run(cfg: Config, eps: Endpoints, stop: threading.Event) -> None:
    """Serve until `stop` is set, then take what workers already sent and flush the outbox (up to 5 s)."""
    egress = Egress(cfg, eps)
    try:
        egress.serve(stop)
        egress.finish(time.monotonic() + 5.0)
    finally:
        egress.close()


class Egress:
    def __init__(self, cfg: Config, eps: Endpoints) -> None:
        ctx = zmq.Context.instance()
        self.cfg, self.stats = cfg, Reporter.connect(eps, "egress")
        self.guard = eps.guard(ctx)  # lets authorized remote workers in (endpoints.remote), else None
        self.pull = eps.bind(ctx, zmq.PULL, "results")
        self.confirm = eps.connect(ctx, zmq.PUSH, "confirms", options={zmq.LINGER: 2000})
        self.confirm.send(envelope.pack([]))  # "egress started": ingress need not wait out its grace period
        self.outbox = Outbox(cfg.default_data_dir() / "outbox.sqlite3", cfg.outbox.max_bytes)
        names = sorted({r.pub.broker for r in cfg.rules})
        self.links = {n: Link(n, cfg.brokers[n], f"{cfg.instance}-egress-{n}") for n in names}
        self.publisher = {n: Publisher(link, self.outbox, cfg.outbox.drain_rate, self.stats)
                          for n, link in self.links.items()}
        self.routes = {r.name: (r.pub.broker, r.pub.qos, r.pub.retain) for r in cfg.rules}
        self.hub = Hub(list(self.links.values()))
        self.hub.register(self.pull)
        self.reading = True
        g = self.stats.gauges
        g["brokers"] = lambda: {n: lk.state for n, lk in self.links.items()}
        g["outbox"] = lambda: {"rows": self.outbox.rows, "bytes": self.outbox.bytes, "full": self.outbox.full}
        if self.outbox.rows:
            log.info("outbox holds %d result(s) from an earlier run: publishing them first", self.outbox.rows)

    def serve(self, stop: threading.Event) -> None:
        log.info("egress up: publishing to %d broker(s), outbox %s", len(self.links), self.outbox.path)
        while not stop.is_set():
            self._backpressure()
            if self.pull in self.hub.poll(50):
                for frame in drain(self.pull, 64):
                    self.take(envelope.decode(frame, Result))
            self.step()

    def step(self) -> None:
        for p in self.publisher.values():
            p.pump()
        self.hub.flush()
        self.stats.tick()

    def _backpressure(self) -> None:
        if self.reading and self.outbox.full:
            log.warning("outbox full (%d bytes): not taking results until it drains", self.outbox.bytes)
            self.hub.unregister(self.pull)
        elif not self.reading and not self.outbox.full:
            self.hub.register(self.pull)
        self.reading = not self.outbox.full

    def take(self, results: list[Result]) -> None:
        safe, confirms = [], []
        self.stats.count("received", len(results))
        for r in results:
            self.stats.count("received." + r.rule)
            self.stats.observe("end_to_end." + r.rule, time.time() - r.received_at)
            if r.source_qos:
                confirms.append([r.message_id, r.rule, r.source_broker])
            if r.kind == envelope.NOTHING:
                self.stats.count("nothing")
                continue
            self.stats.count("error_records" if r.kind == envelope.ERROR else "results")
            broker, qos, retain = self.routes[r.rule]
            retain = int(retain and r.kind == envelope.PUBLISH)
            if r.source_qos:
                safe.append((broker, r.topic, r.payload, qos, retain, r.rule, r.received_at))
            else:
                self.publisher[broker].direct(r.topic, r.payload, qos, retain)
        if safe:
            self.outbox.add(safe)
        if confirms:
            self.confirm.send(envelope.pack(confirms))

    def finish(self, deadline: float) -> None:
        while self.pull.poll(300):
            for frame in drain(self.pull, 64):
                self.take(envelope.decode(frame, Result))
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
    """Moves one broker's outbox rows to paho, oldest first, and deletes them on PUBACK."""

    def __init__(self, link: Link, outbox: Outbox, drain_rate: int, stats: Reporter) -> None:
        self.link, self.outbox, self.rate, self.stats = link, outbox, drain_rate, stats
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
        if self.sent:  # handed on the lost connection and never acknowledged: again, from the outbox
            self.cursor = min(row for row, _ in self.sent.values()) - 1
            self.sent.clear()
        if self.outbox.after(self.link.name, self.cursor, 1):
            self.catch_up_until = self.outbox.db.execute("SELECT max(id) FROM outbox").fetchone()[0]
            log.info("broker %s is back: catching up on the outbox at %d msg/s at most", self.link.name, self.rate)

    def pump(self) -> None:
        self._delete_acked()
        if not self.link.connected or self.outbox.rows == 0:
            return
        room = WINDOW - len(self.sent)
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
        if done:
            self._delete(done)

    def _delete(self, rows: list[tuple[int, int]]) -> None:
        self.outbox.delete(rows)
        self.stats.count("published", len(rows))

    def _delete_acked(self) -> None:
        if self.acked:
            self._delete(self.acked)
            self.acked = []

    def _hand(self, row: Row, done: list[tuple[int, int]]) -> bool:
        """Write one row into the send buffer; QoS 0 rows are done at once (no PUBACK to wait for)."""
        c = self.link.client
        if row.qos == 0:
            if not c.publish0(row.topic, row.payload, bool(row.retain)):
                return False
            done.append((row.id, len(row.payload)))
        else:
            mid = c.publish1(row.topic, row.payload, bool(row.retain))
            if not mid:
                return False
            self.sent[mid] = (row.id, len(row.payload))
        self.cursor = row.id
        return True

    def _on_puback(self, mid: int, reason: int) -> None:
        entry = self.sent.pop(mid, None)
        if reason >= 0x80:
            self._refused(reason, entry)
        if entry is not None:
            self.acked.append(entry)  # refused or not, the row is done: sending it again meets the same answer

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
