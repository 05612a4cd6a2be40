"""The ingress stage: MQTT subscriptions of every rule -> frames to each rule's workers.

One thread does everything (see `mqtt.Hub`): paho's on_message runs inside the poll loop and only queues
the message in its rules' `RuleQueue`s. QoS 1 messages are acknowledged to the broker with manual acks,
in arrival order, once egress confirms every rule's result is safe (`AckWindow`); the session is persistent
(clean_session=False, a stable client id), so whatever was not acked comes again after any crash.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING

import zmq

from pipeline import envelope, topics
from pipeline.endpoints import Endpoints
from pipeline.envelope import Message, Result
from pipeline.ingress.acks import AckWindow
from pipeline.ingress.dispatch import RuleQueue
from pipeline.ingress.pace import ReadPace
from pipeline.mqtt import Hub, Link
from pipeline.sockets import drain
from pipeline.stats import Reporter

if TYPE_CHECKING:  # pipeline.config loads pydantic; a stage gets its config from pipeline.frozen
    from pipeline.config import Config

log = logging.getLogger(__name__)

TICK = 0.2
EGRESS_GRACE = 1.0  # seconds a (re)started egress has to confirm what workers answered before it came


class Router:
    """(broker, topic) -> indices of the rules it feeds, memoised (device topics repeat)."""

    def __init__(self, cfg: Config) -> None:
        self._subs = [(i, r.sub.broker, r.sub.topic) for i, r in enumerate(cfg.rules)]
        self._cache: dict[tuple[str, str], tuple[int, ...]] = {}

    def __call__(self, broker: str, topic: str) -> tuple[int, ...]:
        key = (broker, topic)
        hit = self._cache.get(key)
        if hit is None:
            if len(self._cache) > 100_000:
                self._cache.clear()
            hit = self._cache[key] = tuple(i for i, b, f in self._subs if b == broker and topics.matches(f, topic))
        return hit


def run(cfg: Config, eps: Endpoints, stop: threading.Event) -> None:
    """Serve until `stop` is set, then drain: stop intake, let in-flight work finish, ack it, leave."""
    ingress = Ingress(cfg, eps)
    try:
        ingress.serve(stop)
        ingress.drain(time.monotonic() + max(r.timeout for r in cfg.rules) + 2.0)
    finally:
        ingress.close()


class Ingress:
    def __init__(self, cfg: Config, eps: Endpoints) -> None:
        ctx = zmq.Context.instance()
        self.cfg, self.stats = cfg, Reporter.connect(eps, "ingress")
        self.guard = eps.guard(ctx)  # lets authorized remote workers in (endpoints.remote), else None
        self.routers = [eps.bind(ctx, zmq.ROUTER, "rule", i) for i in range(len(cfg.rules))]
        self.beats, self.confirms = eps.bind(ctx, zmq.PULL, "beats"), eps.bind(ctx, zmq.PULL, "confirms")
        self.letters = eps.connect(ctx, zmq.PUSH, "results")
        self.queues = [RuleQueue(r, s, self.stats, self.letters_send, topics.compile_template(r.error_topic))
                       for r, s in zip(cfg.rules, self.routers, strict=True)]
        self.by_name = {r.name: q for r, q in zip(cfg.rules, self.queues, strict=True)}
        self.links = _links(cfg, self._arrive)
        self.acks = {name: AckWindow(link.client) for name, link in self.links.items()}
        for link in self.links.values():
            link.on_connected = lambda lk: self.acks[lk.name].reset()  # a new session: old packet ids are void
        self.hub = Hub(list(self.links.values()))
        for s in (*self.routers, self.beats, self.confirms):
            self.hub.register(s)
        self.route, self.boot, self.seq = Router(cfg), os.urandom(3).hex(), 0
        self._gauges()

    def _gauges(self) -> None:
        g = self.stats.gauges
        g["brokers"] = lambda: {n: lk.state for n, lk in self.links.items()}
        g["depth"] = lambda: sum(q.depth for q in self.queues)
        g["rules"] = lambda: {q.rule.name: {"pending": q.depth, "in_flight": q.holding, "workers": len(q.workers),
                                            "at_workers": q.at_workers} for q in self.queues}
        g["unacked"] = lambda: {n: len(a) for n, a in self.acks.items()}

    def serve(self, stop: threading.Event) -> None:
        """The loop: MQTT input is read as it comes, or in spaced reads when it is fast or workers lag
        (see `pipeline.ingress.pace`)."""
        log.info("ingress up: %d rule(s) on %d broker(s)", len(self.queues), len(self.links))
        next_tick = 0.0
        hub, pace = self.hub, ReadPace()
        while not stop.is_set():
            self._handle(hub.poll(pace.timeout_ms(time.monotonic())))
            now = time.monotonic()
            for q in self.queues:
                q.dispatch(now)
            hub.flush()
            hub.reading = pace.step(now, self.seq, any(q.pending for q in self.queues))
            if now >= next_tick:
                next_tick = now + TICK
                self._tick(now)

    def _tick(self, now: float) -> None:
        for q in self.queues:
            q.expire(now)
        self.stats.tick()

    def _arrive(self, broker: str, topic: str, payload: bytes, qos: int, mid: int, dup: bool) -> None:
        """One MQTT message, from inside hub.poll() on this thread (paho's on_message or the fast path)."""
        self.seq += 1
        msg_id, now = f"{self.boot}-{self.seq}", time.time()
        waiting: set[str] = set()
        targets = self.route(broker, topic)
        for i in targets:
            q = self.queues[i]
            m = Message(msg_id, q.rule.name, broker, topic, payload, qos, mid, 1, now)
            if qos:
                waiting.add(q.rule.name)
            if len(payload) > q.rule.max_payload_bytes:
                self.stats.count("oversize")
                err = f"payload of {len(payload)} bytes is over max_payload_bytes ({q.rule.max_payload_bytes})"
                self.letters_send(envelope.error_result(m, q.error_topic(topic), "payload_too_large", err))
            else:
                q.offer(m)
        if qos:
            self.acks[broker].add(msg_id, mid, waiting)
        self.stats.count("received")
        if dup:
            self.stats.count("redelivered")  # the broker sent it again: its result may be a duplicate
        if not targets:
            self.stats.count("unrouted")

    def letters_send(self, result: Result) -> None:
        """Dead letters and rejected messages go straight to egress as error records."""
        self.letters.send(envelope.encode([result]))

    def _handle(self, ready: set[zmq.Socket]) -> None:
        now = time.monotonic()
        for i, sock in enumerate(self.routers):
            if sock in ready:
                for ident, frame in drain(sock, multipart=True):
                    _kind, n = envelope.unpack(frame)
                    self.queues[i].on_credit(ident, n, now)
        if self.beats in ready:
            self._beats(now)
        if self.confirms in ready:
            for frame in drain(self.confirms):
                confirms = envelope.unpack(frame)
                if not confirms:  # a (re)started egress: results answered before it came are lost
                    for q in self.queues:
                        q.hasten(now + EGRESS_GRACE)
                for msg_id, rule, broker in confirms:
                    self.by_name[rule].confirm(msg_id)
                    self.acks[broker].done(msg_id, rule)

    def _beats(self, now: float) -> None:
        for frame in drain(self.beats):
            ident, index, kind, value = envelope.unpack(frame)
            if kind == envelope.BEAT:
                self.queues[index].on_beat(ident.encode(), value, now)
            elif kind == envelope.TIMEOUT:
                self.queues[index].on_timeout(ident.encode(), value[0], value[1], now)

    def drain(self, deadline: float) -> None:
        """Stop reading MQTT; wait (until `deadline`) for what workers hold; the rest comes again later."""
        self.hub.reading = False
        for q in self.queues:
            dropped = sum(1 for m in (*q.pending, *q.retry) if not m.qos)
            self.stats.count(f"dropped.{q.rule.name}", dropped)
            q.pending.clear()
            q.retry.clear()
        log.info("ingress draining: %d message(s) in workers", sum(q.holding for q in self.queues))
        while time.monotonic() < deadline and any(q.holding for q in self.queues):
            self._handle(self.hub.poll(50))
            self.hub.flush()
        self.stats.tick(force=True)

    def close(self) -> None:
        for link in self.links.values():
            link.stop()
        self.stats.close()
        for s in (*self.routers, self.beats, self.confirms):
            s.close(linger=0)
        self.letters.close(linger=2000)
        if self.guard is not None:
            self.guard.stop()


def _links(cfg: Config, arrive: object) -> dict[str, Link]:
    links: dict[str, Link] = {}
    for rule in cfg.rules:
        name = rule.sub.broker
        if name not in links:
            link = links[name] = Link(name, cfg.brokers[name], f"{cfg.instance}-ingress-{name}",
                                      clean_session=False, manual_ack=True)
            link.on_publish = lambda t, p, q, mid, dup, b=name: arrive(b, t, p, q, mid, dup)
        links[name].subscribe(rule.sub.topic, rule.sub.qos, rule.sub.share)
    return links
