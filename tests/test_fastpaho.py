"""FastClient writes QoS 0 PUBLISH and PUBACK packets itself: they must be byte for byte what paho sends."""

from __future__ import annotations

import socket

import paho.mqtt.client as mqtt
import pytest

from pipeline.fastpaho import FastClient


def _paho_publish(protocol: int, topic: str, payload: bytes, retain: bool) -> bytes:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=protocol)
    a, b = socket.socketpair()
    c._sock = a  # _send_publish refuses to build a packet without a socket
    packets: list[bytes] = []
    c._packet_queue = lambda _cmd, packet, _mid, _qos, _info=None: packets.append(bytes(packet)) or 0
    c._send_publish(0, topic.encode(), payload, 0, retain)
    b.close()
    return packets[0]


@pytest.mark.parametrize("protocol", [mqtt.MQTTv311, mqtt.MQTTv5])
@pytest.mark.parametrize("size", [0, 1, 126, 127, 128, 16_383, 16_384, 300_000])
@pytest.mark.parametrize("retain", [False, True])
def test_publish0_matches_paho(protocol, size, retain):
    c = FastClient(mqtt.CallbackAPIVersion.VERSION2, protocol=protocol)
    c.is_connected = lambda: True
    payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    assert c.publish0("plant/dévice/alarm", payload, retain)
    assert bytes(c._wbuf) == _paho_publish(protocol, "plant/dévice/alarm", payload, retain)


def test_publish0_refuses_when_not_connected():
    c = FastClient(mqtt.CallbackAPIVersion.VERSION2)
    assert c.publish0("t", b"x") is False and not c.unflushed()


def test_puback_bytes():
    c = FastClient(mqtt.CallbackAPIVersion.VERSION2)
    c.puback(0x1234)
    assert bytes(c._wbuf) == b"\x40\x02\x12\x34"
