"""A raw-socket MQTT server of the tests' own, for what a real broker never sends: malformed packets, topics
that are not UTF-8, PUBACK failure reasons on demand. It speaks just enough MQTT 3.1.1 and 5 to be connected
to and subscribed with; everything it receives is recorded."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish(topic: bytes, payload: bytes, qos: int = 1, mid: int = 1, v5: bool = False) -> bytes:
    """A PUBLISH packet as a broker sends it (the topic as raw bytes: they need not be UTF-8)."""
    body = len(topic).to_bytes(2, "big") + topic + (mid.to_bytes(2, "big") if qos else b"") + \
        (b"\x00" if v5 else b"") + payload
    return bytes([0x30 | qos << 1]) + varint(len(body)) + body


@dataclass
class Wait:
    """A script step: wait until the PUBACKs of these packet ids came on this connection."""

    mids: set[int]


@dataclass
class Published:
    """A PUBLISH the server received."""

    topic: bytes
    payload: bytes
    qos: int
    mid: int


@dataclass
class Connection:
    """What one client connection sent."""

    pubacks: list[int] = field(default_factory=list)
    published: list[Published] = field(default_factory=list)
    closed: threading.Event = field(default_factory=threading.Event)
    v5: bool = False
    subscribed: bool = False


class FakeBroker:
    """Serves on 127.0.0.1 (a free port). Connection n, after its first SUBSCRIBE, gets the steps of
    `scripts[n]` (bytes are sent as they are; `Wait` waits for PUBACKs, a threading.Event until the test sets
    it). A QoS 1 PUBLISH it receives is
    answered with PUBACK reason `puback_reason(n)`, n counting every QoS 1 PUBLISH from 0. `speaks_5=False`:
    an MQTT 5 CONNECT is refused as Mosquitto before 1.6 refuses it (CONNACK return code 1, then a close)."""

    def __init__(self, scripts: list[list[bytes | Wait | threading.Event]] | None = None,
                 puback_reason: Callable[[int], int] = lambda _n: 0, speaks_5: bool = True) -> None:
        self.scripts = scripts or []
        self.speaks_5 = speaks_5
        self.puback_reason = puback_reason
        self.connections: list[Connection] = []
        self.qos1_received = 0
        self.lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.running = True
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.running = False
        self.server.close()

    def _accept(self) -> None:
        while self.running:
            try:
                sock, _ = self.server.accept()
            except OSError:
                return
            with self.lock:
                conn = Connection()
                index = len(self.connections)
                self.connections.append(conn)
            threading.Thread(target=self._serve, args=(sock, conn, index), daemon=True).start()

    def _serve(self, sock: socket.socket, conn: Connection, index: int) -> None:
        try:
            while self.running:
                packet = _read_packet(sock)
                if packet is None or packet[0] == 14:  # closed, or DISCONNECT
                    return
                if packet[0] == 1 and packet[2][6] == 5 and not self.speaks_5:
                    conn.v5 = True
                    sock.sendall(b"\x20\x02\x00\x01")  # unacceptable protocol version
                    return
                self._answer(sock, conn, index, *packet)
        except OSError:
            return
        finally:
            conn.closed.set()
            sock.close()

    def _answer(self, sock: socket.socket, conn: Connection, index: int, kind: int, flags: int, body: bytes) -> None:
        if kind == 1:  # CONNECT: protocol level after the protocol name
            conn.v5 = body[6] == 5
            sock.sendall(b"\x20\x03\x00\x00\x00" if conn.v5 else b"\x20\x02\x00\x00")
        elif kind == 8:  # SUBSCRIBE
            sock.sendall(_suback(body, conn.v5))
            if not conn.subscribed and index < len(self.scripts):
                threading.Thread(target=self._play, args=(sock, conn, self.scripts[index]), daemon=True).start()
            conn.subscribed = True
        elif kind == 12:  # PINGREQ
            sock.sendall(b"\xd0\x00")
        elif kind == 4:  # PUBACK
            conn.pubacks.append(int.from_bytes(body[:2], "big"))
        elif kind == 3:
            self._published(sock, conn, flags, body, conn.v5)

    def _published(self, sock: socket.socket, conn: Connection, flags: int, body: bytes, v5: bool) -> None:
        qos = (flags >> 1) & 3
        n = int.from_bytes(body[:2], "big")
        topic, rest = body[2:2 + n], body[2 + n:]
        mid = int.from_bytes(rest[:2], "big") if qos else 0
        rest = rest[2:] if qos else rest
        if v5:
            length, at = _varint_at(rest, 0)
            rest = rest[at + length:]
        conn.published.append(Published(topic, rest, qos, mid))
        if qos == 1:
            with self.lock:
                reason = self.puback_reason(self.qos1_received)
                self.qos1_received += 1
            sock.sendall(b"\x40\x03" + mid.to_bytes(2, "big") + bytes([reason]) if v5 else
                         b"\x40\x02" + mid.to_bytes(2, "big"))

    def _play(self, sock: socket.socket, conn: Connection, steps: list[bytes | Wait | threading.Event]) -> None:
        time.sleep(0.3)  # the SUBACK first
        for step in steps:
            if isinstance(step, threading.Event):
                step.wait(60)
                continue
            if isinstance(step, Wait):
                deadline = time.monotonic() + 30
                while not step.mids <= set(conn.pubacks) and time.monotonic() < deadline:
                    time.sleep(0.05)
                continue
            try:
                sock.sendall(step)
            except OSError:
                return


def _varint_at(buf: bytes, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i
        shift += 7


def _read_exactly(sock: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _read_packet(sock: socket.socket) -> tuple[int, int, bytes] | None:
    head = _read_exactly(sock, 1)
    if head is None:
        return None
    length, shift = 0, 0
    while True:
        b = _read_exactly(sock, 1)
        if b is None:
            return None
        length |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            break
        shift += 7
    body = _read_exactly(sock, length) if length else b""
    return (head[0] >> 4, head[0] & 0x0F, body) if body is not None else None


def _suback(body: bytes, v5: bool) -> bytes:
    """A SUBACK granting each filter of a SUBSCRIBE the QoS it asked for."""
    mid, at = body[:2], 2
    if v5:
        length, at = _varint_at(body, at)
        at += length
    codes = bytearray()
    while at < len(body):
        n = int.from_bytes(body[at:at + 2], "big")
        at += 2 + n
        codes.append(body[at] & 3)
        at += 1
    rest = mid + (b"\x00" if v5 else b"") + bytes(codes)
    return b"\x90" + varint(len(rest)) + rest
