"""paho-mqtt clients set up the way every stage needs them.

A `Link` owns one paho client running its own network thread (loop_start), connected asynchronously so a
stack starts while the broker is down and reconnects with backoff. Callers pass plain callables; paho
calls them on its network thread, so they must never block.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Callable

import paho.mqtt.client as mqtt

from pipeline.config import Broker

log = logging.getLogger(__name__)

MAX_QUEUED = 20_000  # paho keys its queue by 16-bit mid: stay well below 65,535 (see docs/architecture.md)
MAX_INFLIGHT = 200


class Link:
    """One MQTT connection: `state` is "connecting", "connected" or "disconnected"."""

    def __init__(self, name: str, broker: Broker, client_id: str, *, clean_session: bool = True) -> None:
        self.name = name
        self.state = "connecting"
        self.subscriptions: dict[str, int] = {}
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            protocol=mqtt.MQTTv311,
        )
        c = self.client
        if broker.username:
            c.username_pw_set(broker.username, broker.password.get_secret_value() if broker.password else None)
        if broker.scheme == "mqtts":
            c.tls_set(cert_reqs=ssl.CERT_REQUIRED)
        c.max_inflight_messages_set(MAX_INFLIGHT)
        c.max_queued_messages_set(MAX_QUEUED)
        c.reconnect_delay_set(min_delay=1, max_delay=30)
        c.on_socket_open = _nodelay
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_subscribe = self._on_subscribe
        self._target = (broker.host, broker.port, broker.keepalive)

    def subscribe(self, topic_filter: str, qos: int) -> None:
        """Remember a subscription; it is (re)made on every connect."""
        self.subscriptions[topic_filter] = max(qos, self.subscriptions.get(topic_filter, 0))

    def on_message(self, callback: Callable[[mqtt.MQTTMessage], None]) -> None:
        self.client.on_message = lambda _c, _u, msg: callback(msg)

    def start(self) -> None:
        host, port, keepalive = self._target
        self.client.connect_async(host, port, keepalive)
        self.client.loop_start()

    def stop(self) -> None:
        self.state = "stopped"
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client: mqtt.Client, _u: object, _f: object, rc: mqtt.ReasonCode, _p: object) -> None:
        host, port, _ = self._target
        if rc.is_failure:
            self.state = "disconnected"
            log.error("broker %s (%s:%s) refused the connection: %s", self.name, host, port, rc)
            return
        log.info("connected to broker %s (%s:%s)", self.name, host, port)
        if self.subscriptions:
            self.state = "subscribing"  # "connected" once the broker acknowledged every subscription
            client.subscribe(list(self.subscriptions.items()))
        else:
            self.state = "connected"

    def _on_subscribe(self, _c: mqtt.Client, _u: object, _mid: int, codes: list[mqtt.ReasonCode], _p: object) -> None:
        refused = [f for f, rc in zip(self.subscriptions, codes, strict=False) if rc.is_failure]
        if refused:
            self.state = "subscription refused"
            log.error("broker %s refused the subscription to %s", self.name, ", ".join(refused))
        else:
            self.state = "connected"
            log.info("subscribed on broker %s to %s", self.name, ", ".join(self.subscriptions))

    def _on_disconnect(self, _c: mqtt.Client, _u: object, _f: object, rc: mqtt.ReasonCode, _p: object) -> None:
        if self.state == "stopped":
            return
        if self.state == "connected":
            log.warning("disconnected from broker %s: %s; reconnecting", self.name, rc)
        self.state = "disconnected"


def _nodelay(_client: mqtt.Client, _userdata: object, sock: socket.socket) -> None:
    # paho never sets TCP_NODELAY: without it Nagle adds ~40 ms stalls to small publishes.
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:  # not a TCP socket (unix socket, websocket wrapper)
        pass
