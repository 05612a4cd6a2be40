"""The egress stage: one PULL socket for all results, one paho client per output broker.

paho's publish() only queues (its network thread writes); when paho's bounded queue is full the stage
waits for it to drain instead of dropping, which backs pressure up through ZMQ to the workers.
"""

from __future__ import annotations

import logging
import threading
import time

import paho.mqtt.client as mqtt
import zmq

from pipeline import envelope
from pipeline.config import Config
from pipeline.endpoints import Endpoints
from pipeline.mqtt import Link
from pipeline.stats import Reporter

log = logging.getLogger(__name__)


def _links(cfg: Config) -> dict[str, Link]:
    names = {r.pub.broker for r in cfg.rules}
    return {n: Link(n, cfg.brokers[n], f"{cfg.instance}-egress-{n}") for n in sorted(names)}


def run(cfg: Config, eps: Endpoints, stop: threading.Event) -> None:
    """Run until `stop` is set, then publish what already arrived and let paho flush it."""
    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    pull.bind(eps.results())
    stats = Reporter(ctx, eps.stats(), "egress")
    links = _links(cfg)
    stats.gauges["brokers"] = lambda: {n: lk.state for n, lk in links.items()}
    for link in links.values():
        link.start()
    out = Publisher(cfg, links, stats, stop)
    log.info("egress up: publishing to %d broker(s)", len(links))
    try:
        while not stop.is_set():
            stats.tick()
            if pull.poll(200):
                out.publish(envelope.decode(pull.recv(), envelope.Result))
        while pull.poll(300):  # drain what workers sent before they stopped
            out.publish(envelope.decode(pull.recv(), envelope.Result))
        out.flush(timeout=5.0)
    finally:
        for link in links.values():
            link.stop()
        stats.close()
        pull.close(linger=0)


class Publisher:
    def __init__(self, cfg: Config, links: dict[str, Link], stats: Reporter, stop: threading.Event) -> None:
        self.routes = {r.name: (links[r.pub.broker].client, r.pub.qos, r.pub.retain) for r in cfg.rules}
        self.stats, self.stop = stats, stop
        self.last: dict[str, mqtt.MQTTMessageInfo] = {}

    def publish(self, results: list[envelope.Result]) -> None:
        self.stats.count("received", len(results))
        for r in results:
            if r.kind == envelope.NOTHING:
                self.stats.count("nothing")
                continue
            self.stats.observe("end_to_end." + r.rule, time.time() - r.received_at)
            client, qos, retain = self.routes[r.rule]
            while True:
                info = client.publish(r.topic, r.payload, qos, retain and r.kind == envelope.PUBLISH)
                if info.rc != mqtt.MQTT_ERR_QUEUE_SIZE:
                    break
                time.sleep(0.005)  # paho's queue is full: wait for the network thread to drain it
            # QoS>0 while disconnected: paho keeps it and sends it after reconnecting
            if info.rc == mqtt.MQTT_ERR_SUCCESS or (qos and info.rc == mqtt.MQTT_ERR_NO_CONN):
                self.stats.count("published" if r.kind == envelope.PUBLISH else "error_records")
                self.last[r.rule] = info
            else:
                self.stats.count("dropped")
                log.warning("dropped result of %s on %s: %s", r.message_id, r.topic, mqtt.error_string(info.rc))

    def flush(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for info in self.last.values():
            try:
                info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            except (RuntimeError, ValueError):
                pass
