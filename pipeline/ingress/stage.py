"""The ingress stage.

paho's network thread only appends (broker, MQTTMessage, time) to a SimpleQueue: it never blocks, so
keepalives and acks keep flowing. The stage's own thread takes batches from that queue, routes each message
to every rule whose filter matches, and sends one frame per rule per batch. Only this thread touches ZMQ.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt
import zmq

from pipeline import envelope, topics
from pipeline.config import Config
from pipeline.endpoints import Endpoints
from pipeline.mqtt import Link
from pipeline.stats import Reporter

log = logging.getLogger(__name__)

BATCH = 64
SNDHWM = 10_000


class Router:
    """topic -> indices of the rules it feeds, memoised (device topics repeat)."""

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


def _links(cfg: Config, put: Callable[[tuple], None]) -> dict[str, Link]:
    links: dict[str, Link] = {}
    for rule in cfg.rules:
        name = rule.sub.broker
        if name not in links:
            link = links[name] = Link(name, cfg.brokers[name], f"{cfg.instance}-ingress-{name}", clean_session=False)
            link.on_message(lambda msg, b=name: put((b, msg, time.time())))
        links[name].subscribe(rule.sub.topic, rule.sub.qos)
    return links


def run(cfg: Config, eps: Endpoints, stop: threading.Event) -> None:
    """Run until `stop` is set."""
    ctx = zmq.Context.instance()
    inbox: queue.SimpleQueue[tuple[str, mqtt.MQTTMessage, float]] = queue.SimpleQueue()
    socks = []
    for i, _rule in enumerate(cfg.rules):
        s = ctx.socket(zmq.PUSH)
        s.setsockopt(zmq.SNDHWM, SNDHWM)
        s.setsockopt(zmq.LINGER, 2000)
        s.bind(eps.rule(i))
        socks.append(s)
    stats = Reporter(ctx, eps.stats(), "ingress")
    links = _links(cfg, inbox.put)
    stats.gauges["brokers"] = lambda: {n: lk.state for n, lk in links.items()}
    stats.gauges["depth"] = inbox.qsize
    for link in links.values():
        link.start()
    log.info("ingress up: %d rule(s) on %d broker(s)", len(cfg.rules), len(links))
    try:
        _loop(cfg, socks, inbox, stats, stop)
    finally:
        for link in links.values():
            link.stop()
        stats.close()
        for s in socks:
            s.close()


def _loop(
    cfg: Config, socks: list[zmq.Socket], inbox: queue.SimpleQueue, stats: Reporter, stop: threading.Event
) -> None:
    route, boot, seq = Router(cfg), secrets.token_hex(3), 0
    names = [r.name for r in cfg.rules]
    per_rule = [f"dispatched.{n}" for n in names]
    while not stop.is_set():
        stats.tick()
        try:
            batch = [inbox.get(timeout=0.2)]
        except queue.Empty:
            continue
        while len(batch) < BATCH:
            try:
                batch.append(inbox.get_nowait())
            except queue.Empty:
                break
        frames: dict[int, list[envelope.Message]] = {}
        for broker, msg, ts in batch:
            seq += 1
            targets = route(broker, msg.topic)
            for i in targets:
                m = envelope.Message(f"{boot}-{seq}", names[i], broker, msg.topic, msg.payload, msg.qos, msg.mid, 1, ts)
                frames.setdefault(i, []).append(m)
            if not targets:
                stats.count("unrouted")
        stats.count("received", len(batch))
        for i, msgs in frames.items():
            socks[i].send(envelope.encode(msgs))
            stats.count("dispatched", len(msgs))
            stats.count(per_rule[i], len(msgs))
