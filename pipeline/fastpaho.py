"""A paho client with buffered socket I/O, for stages that drive paho from their own loop.

paho reads each packet's header a byte at a time (two or three recv() calls per message) and writes each
packet with its own send(). `FastClient` serves reads from one large recv() and gathers writes until the
stage flushes them once per loop turn: on a busy link a single pair of syscalls then carries dozens of
messages. It overrides paho's `_sock_recv`/`_sock_send`, so paho is pinned below 3 in setup.cfg.
"""

from __future__ import annotations

from typing import Any

import paho.mqtt.client as mqtt

READ_SIZE = 256 * 1024


class FastClient(mqtt.Client):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rbuf: bytes = b""
        self._rpos = 0
        self._wbuf = bytearray()
        self._topics: dict[str, bytes] = {}  # topic -> its encoded length, name (and empty properties)
        self._props = b"\x00" if kwargs.get("protocol") == mqtt.MQTTv5 else b""

    def buffered(self) -> bool:
        """True when bytes already read from the socket wait to be parsed (no syscall needed)."""
        return self._rpos < len(self._rbuf)

    def unflushed(self) -> bool:
        return bool(self._wbuf)

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._rpos >= len(self._rbuf):
            data = super()._sock_recv(READ_SIZE)  # BlockingIOError when nothing is there: paho expects it
            if not data:
                return data  # the peer closed the connection
            self._rbuf, self._rpos = data, 0
        chunk = self._rbuf[self._rpos:self._rpos + bufsize]
        self._rpos += len(chunk)
        return chunk

    def _sock_send(self, buf: bytes | bytearray) -> int:
        self._wbuf += buf
        return len(buf)

    def flush(self) -> bool:
        """Write what paho gathered; False when the socket is full (poll for POLLOUT and call again).

        Raises OSError when the connection is broken."""
        while self._wbuf:
            try:
                n = super()._sock_send(self._wbuf)
            except BlockingIOError:
                return False
            del self._wbuf[:n]
        return True

    def publish0(self, topic: str, payload: bytes, retain: bool = False) -> bool:
        """A QoS 0 PUBLISH written straight into the send buffer (paho's publish() costs ~5x more per
        message). False when not connected: the caller counts the drop."""
        if not self.is_connected():
            return False
        t = self._topics.get(topic)
        if t is None:
            if len(self._topics) > 10_000:
                self._topics.clear()
            raw = topic.encode()
            t = self._topics[topic] = len(raw).to_bytes(2, "big") + raw + self._props
        w = self._wbuf
        w.append(0x31 if retain else 0x30)
        _varint(w, len(t) + len(payload))
        w += t
        w += payload
        return True

    def puback(self, mid: int) -> None:
        """A PUBACK for a manually acknowledged QoS 1 message, straight into the send buffer."""
        self._wbuf += bytes((0x40, 2, mid >> 8, mid & 0xFF))  # MQTT 5 allows the short form for success

    def reconnect(self) -> mqtt.MQTTErrorCode:
        self._rbuf, self._rpos = b"", 0  # bytes of an earlier connection mean nothing on the new one
        self._wbuf.clear()
        return super().reconnect()


def _varint(buf: bytearray, n: int) -> None:
    """MQTT "remaining length": 7 bits per byte, high bit = more bytes follow."""
    while True:
        byte, n = n & 0x7F, n >> 7
        if n:
            buf.append(byte | 0x80)
        else:
            buf.append(byte)
            return
