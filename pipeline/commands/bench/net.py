"""MQTT client set-up shared by the load generator and the receiver."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt

from pipeline.wire.fastpaho import FastClient


def nodelay(_client: mqtt.Client, _userdata: object, sock: socket.socket) -> None:
    """paho's on_socket_open: no Nagle delay (it adds ~40 ms stalls to small messages)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass  # not a TCP socket (a unix socket or a TLS wrapper without the option)


def client(url: str, client_id: str, max_inflight: int) -> tuple[FastClient, str, int]:
    """A paho 2.x client for mqtt[s]://[USER:PASS@]HOST[:PORT] with TCP_NODELAY; returns it, host and port.
    A FastClient: what paho writes waits in its buffer until flush()."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts", "tcp"):
        raise ValueError(f"expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT] (got {url!r})")
    c = FastClient(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    c.max_inflight_messages_set(max_inflight)
    c.on_socket_open = nodelay
    if parts.username:
        c.username_pw_set(parts.username, parts.password)
    if parts.scheme == "mqtts":
        c.tls_set()
    return c, parts.hostname or "127.0.0.1", parts.port or (8883 if parts.scheme == "mqtts" else 1883)
