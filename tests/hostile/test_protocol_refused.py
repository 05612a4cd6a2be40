"""`protocol: auto` against a broker that answers an MQTT 5 CONNECT with CONNACK return code 1 and closes, as
Mosquitto before 1.6 does (no such broker is installed here; the raw-socket server answers as it would): the Link
steps down to 3.1.1 at once, connects and subscribes, and keeps 3.1.1 for its reconnects."""

from __future__ import annotations

import logging
import socket
import time

from fakebroker import FakeBroker


def _until(hub, cond, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        hub.poll(20)
        hub.flush()


def test_auto_steps_down_to_311_when_connack_refuses_mqtt5(caplog):
    from pipeline.config.load import Broker
    from pipeline.wire.mqtt import Hub, Link

    caplog.set_level(logging.INFO, logger="pipeline.mqtt")
    fake = FakeBroker(speaks_5=False)
    link = Link("old", Broker(url=fake.url), "auto-refused", clean_session=False)
    link.subscribe("in/+", 1)
    hub = Hub([link])
    try:
        t0 = time.monotonic()
        _until(hub, lambda: link.connected, 10)
        assert link.connected and link.chosen == link.protocol == "3.1.1"
        assert time.monotonic() - t0 < 1.5, "a refusal is answered at once, not after a timeout or a backoff"
        assert [c.v5 for c in fake.connections] == [True, False]
        assert "MQTT 5 connect failed (the broker refused it: Unsupported protocol version)" in caplog.text
        assert caplog.text.count("MQTT 3.1.1 chosen (protocol: auto)") == 1
        assert "cannot reach broker" not in caplog.text
        link.client.socket().shutdown(socket.SHUT_RDWR)  # the connection drops: the reconnect speaks 3.1.1 at once
        _until(hub, lambda: len(fake.connections) == 3 and link.connected, 10)
        assert [c.v5 for c in fake.connections] == [True, False, False] and link.connected
        assert caplog.text.count("MQTT 3.1.1 chosen") == 1  # logged once per change
    finally:
        link.stop()
        fake.stop()
