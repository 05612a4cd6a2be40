"""A paho client with buffered socket I/O, for stages that drive paho from their own loop.

paho reads each packet's header a byte at a time (two or three recv() calls per message) and writes each
packet with its own send(). `FastClient` serves reads from one large recv() and gathers writes until the
stage flushes them once per loop turn: on a busy link a single pair of syscalls then carries dozens of
messages. It overrides and reads private names of paho (PAHO_INTERNALS), so setup.cfg pins paho-mqtt to the
minor version they were checked on; tests/test_fastpaho.py fails naming any that an installed paho lacks.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

READ_SIZE = 256 * 1024
QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux only
# (topic, payload, qos, mid, dup, subscription ids): the ids (MQTT 5) of the subscriptions this copy was sent for,
# () when the packet carries none (MQTT 3.1.1, or a subscription made without one)
Deliver = Callable[[str, bytes, int, int, bool, tuple[int, ...]], None]
Acked = Callable[[int, int], None]  # (mid, reason): reason 0 = success; MQTT 5 codes >= 0x80 = refused

PAHO_CHECKED = "2.2"  # the paho-mqtt minor version whose internals FastClient was written against
PAHO_INTERNALS = (  # private names of paho's Client that FastClient overrides, calls or reads
    "_sock_recv", "_sock_send", "_mid_generate", "_handle_pubackcomp", "_update_inflight",  # methods
    "_sock", "_in_packet", "_out_messages", "_inflight_messages", "_msgtime_mutex", "_last_bytes_received",
    "_protocol", "_clean_session",  # set by use_protocol
)


def missing_internals() -> list[str]:
    """The names of PAHO_INTERNALS (and `time_func` of paho's client module) the installed paho lacks."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    missing = [name for name in PAHO_INTERNALS if not hasattr(client, name)]
    return missing + ([] if callable(getattr(mqtt, "time_func", None)) else ["time_func"])


class FastClient(mqtt.Client):
    """A paho `Client` whose socket reads come from one buffer and whose writes wait for `flush()`. Owns the
    read and write buffers and the encoded topics; the stage's loop must flush once per turn. Relies on paho's
    private socket methods (see tests/test_fastpaho.py for the check of the paho version)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rbuf: bytes = b""
        self._rpos = 0
        self._wbuf = bytearray()
        self._topics: dict[str, bytes] = {}  # topic -> its encoded length, name (and empty properties)
        self._props = b"\x00" if kwargs.get("protocol") == mqtt.MQTTv5 else b""
        # PUBACKs of packets sent with publish1() (paho never knew them): from take_publishes, or from paho's
        # own reader when a PUBACK was split across two reads. MQTT 5 PUBACKs carry a reason code: 0x87 (not
        # authorized), 0x97 (quota exceeded)... mean the broker did not take the message
        self.on_puback: Acked | None = None
        self.read_error = mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS  # why the last `read` failed (PROTOCOL: malformed)

    def use_protocol(self, protocol: int, clean_session: bool) -> None:
        """Speak `protocol` (MQTTv5 or MQTTv311) from the next connect on; `clean_session` for 3.1.1 (MQTT 5's
        clean_start and session expiry come from `connect_async`). Call only while not connected."""
        self._protocol = protocol
        self._clean_session = clean_session
        self._props = b"\x00" if protocol == mqtt.MQTTv5 else b""
        self._topics.clear()  # encoded with the properties byte of the old version

    def buffered(self) -> bool:
        """True when bytes already read from the socket wait to be parsed (no syscall needed)."""
        return self._rpos < len(self._rbuf)

    def unflushed(self) -> bool:
        return bool(self._wbuf)

    def _sock_recv(self, bufsize: int) -> bytes:
        # _recv raises BlockingIOError when nothing is there, as paho expects
        if self._rpos >= len(self._rbuf) and not self._recv():
            return b""  # the peer closed the connection
        chunk = self._rbuf[self._rpos:self._rpos + bufsize]
        self._rpos += len(chunk)
        return chunk

    def fill(self) -> bool:
        """Refill the read buffer with one recv() once it is consumed; False when the socket had nothing.
        A closed or broken connection leaves the buffer empty and returns True: paho's next read meets the
        same condition and reports it."""
        if self._rpos < len(self._rbuf):
            return True
        try:
            self._recv()
        except BlockingIOError:
            return False
        except OSError:
            return True
        return True

    def _recv(self) -> bytes:
        """One recv() into the consumed read buffer, then TCP_QUICKACK; b"" when the peer closed. Raises what
        the socket raises (BlockingIOError when nothing is there)."""
        data = super()._sock_recv(READ_SIZE)
        if data:
            self._rbuf, self._rpos = data, 0
            self._quickack()
        return data

    def _quickack(self) -> None:
        """Acknowledge what arrives at once (TCP_QUICKACK; Linux clears it again, so it is set after each read).

        A stage that reads in spaced batches (ingress at high rates) otherwise meets a 40 ms stall: the kernel
        delays its ACK, and a broker without TCP_NODELAY (Mosquitto's default) holds every further small
        packet until that ACK comes (Nagle). Measured at 5,000 msg/s: p50 8.4 ms, p90 38 ms without it;
        2.9 / 3.6 ms with it."""
        if QUICKACK is not None and self._sock is not None:
            try:
                self._sock.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)
            except (OSError, AttributeError):  # not TCP (unix socket), or a wrapper without setsockopt
                pass

    def read(self, deliver: Deliver | None, max_packets: int = 256) -> bool:
        """Handle what the socket has: one recv(), then every complete packet already buffered: PUBLISH packets
        through `deliver` when given (manual acks), PUBACKs of `publish1`'s packets through `on_puback` when
        set, the others through paho. False when the connection failed (paho has closed the socket)."""
        fast = deliver is not None or self.on_puback is not None
        for _ in range(max_packets):
            if fast:
                if not self.fill():
                    return True  # nothing to read
                if self.take_publishes(deliver, on_puback=self.on_puback) and not self.buffered():
                    return True
            rc = self.loop_read()
            if rc != mqtt.MQTT_ERR_SUCCESS:
                self.read_error = rc
                return False
            if not self.buffered():
                return True
        return True

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

    def publish1(self, topic: str, payload: bytes, retain: bool = False) -> int:
        """A QoS 1 PUBLISH written straight into the send buffer; returns its packet id. paho does not track
        it: the caller keeps what is unacknowledged, gets PUBACKs from `take_publishes(on_puback=...)` and
        sends again after a reconnect. Not connected: 0 (nothing written)."""
        if not self.is_connected():
            return 0
        mid = self._mid_generate()
        raw = topic.encode()
        w = self._wbuf
        w.append(0x33 if retain else 0x32)
        _varint(w, 2 + len(raw) + 2 + len(self._props) + len(payload))
        w += len(raw).to_bytes(2, "big")
        w += raw
        w += mid.to_bytes(2, "big")
        w += self._props
        w += payload
        return mid

    def puback(self, mid: int) -> None:
        """A PUBACK for a manually acknowledged QoS 1 message, straight into the send buffer."""
        self._wbuf += bytes((0x40, 2, mid >> 8, mid & 0xFF))  # MQTT 5 allows the short form for success

    def take_publishes(self, deliver: Deliver | None, limit: int = 256,
                       on_puback: Acked | None = None) -> int:
        """Hand the complete QoS 0/1 PUBLISH packets at the head of the read buffer to
        `deliver(topic, payload, qos, mid, dup, subscription ids)`, and PUBACKs to `on_puback(mid, reason)`,
        without paho's per-packet machinery (MQTTMessage, ReasonCode, logging, callback lookup: ~4x the cost
        of this). Stops at anything else (another packet type, QoS 2, a topic alias, bad UTF-8, a PUBLISH
        property it does not know, an incomplete packet, or a packet paho has started reading): paho reads
        that one. PUBLISH only for manually acknowledged QoS 1 (the caller
        acks), PUBACK only for packets sent with `publish1`; returns how many packets were taken."""
        if self._in_packet["command"] != 0 or self._sock is None:
            return 0
        buf, pos, end, n = self._rbuf, self._rpos, len(self._rbuf), 0
        while n < limit and pos < end:
            cmd = buf[pos]
            qos = (cmd >> 1) & 3
            head = _remaining(buf, pos + 1, end)
            if head is None or head[0] + head[1] > end:
                break
            start, length = head
            if cmd == 0x40 and on_puback is not None and length >= 2:  # PUBACK (MQTT 5: reason, properties)
                pos = self._rpos = start + length
                n += 1
                on_puback(buf[start] << 8 | buf[start + 1], buf[start + 2] if length > 2 else 0)
                continue
            if cmd >> 4 != 3 or qos > 1 or deliver is None:
                break
            parsed = self._publish(buf, start, length, qos)
            if parsed is None:
                break
            topic, p, mid, subs = parsed
            pos = self._rpos = start + length
            n += 1
            deliver(topic, buf[p:pos], qos, mid, bool(cmd & 8), subs)
        if n:
            with self._msgtime_mutex:
                self._last_bytes_received = mqtt.time_func()
        return n

    def _publish(self, buf: bytes, start: int, length: int, qos: int) -> tuple[str, int, int, tuple[int, ...]] | None:
        """(topic, where the payload starts, packet id, subscription ids) of the PUBLISH whose variable header
        starts at buf[start]; None when paho should read it: a topic alias, a topic that is not UTF-8, a property
        this does not know, or a malformed packet (shorter than its topic or packet id, an empty MQTT 3.1.1
        topic, properties that run past its end), which paho refuses by closing the connection. Nothing here
        reads past the packet."""
        end = start + length
        if length < 2:
            return None
        t = start + 2 + (buf[start] << 8 | buf[start + 1])
        if t + (2 if qos else 0) > end or (t == start + 2 and not self._props):
            return None
        mid, p = (buf[t] << 8 | buf[t + 1], t + 2) if qos else (0, t)
        subs: tuple[int, ...] = ()
        if self._props:  # MQTT 5: the subscription ids; the other properties are skipped
            props = _remaining(buf, p, end)
            if props is None or t == start + 2 or props[0] + props[1] > end:
                return None
            p, size = props
            if size == 3 and buf[p] == SUBSCRIPTION_ID and buf[p + 1] & 0x80 and 0 < buf[p + 2] < 0x80:
                subs, p = (buf[p + 1] & 0x7F | buf[p + 2] << 7,), p + 3  # the usual: one id of two bytes
            elif size:
                ids = _sub_ids(buf, p, p + size)
                if ids is None:
                    return None
                subs, p = ids, p + size
        try:
            return buf[start + 2:t].decode(), p, mid, subs
        except UnicodeDecodeError:
            return None

    def _handle_pubackcomp(self, cmd: Any) -> mqtt.MQTTErrorCode:
        packet = self._in_packet["packet"]
        if cmd == "PUBACK" and self.on_puback is not None and len(packet) >= 2:
            mid = packet[0] << 8 | packet[1]
            if mid not in self._out_messages:  # one of publish1's
                self.on_puback(mid, packet[2] if len(packet) > 2 else 0)
                return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
        return super()._handle_pubackcomp(cmd)

    def _update_inflight(self) -> mqtt.MQTTErrorCode:
        """paho calls this after every PUBACK and walks every outgoing message looking for queued ones: O(n)
        per PUBACK with n up to max_inflight (1,000 here), which made QoS 1 publishing cost ~3x QoS 0. When
        every outgoing message is already in flight there is nothing queued to send: skip the walk."""
        if len(self._out_messages) <= self._inflight_messages:
            return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
        return super()._update_inflight()

    def reconnect(self) -> mqtt.MQTTErrorCode:
        self._rbuf, self._rpos = b"", 0  # bytes of an earlier connection mean nothing on the new one
        self._wbuf.clear()
        return super().reconnect()


_SKIP_FIXED = {0x01: 1, 0x02: 4, 0x23: 2}  # PUBLISH properties of a fixed size: format, expiry, topic alias
_SKIP_STRINGS = {0x03: 1, 0x08: 1, 0x09: 1, 0x26: 2}  # content type, response topic, correlation data: one
# length-prefixed string each; a user property: two
SUBSCRIPTION_ID = 0x0B


def _sub_ids(buf: bytes, i: int, end: int) -> tuple[int, ...] | None:
    """The Subscription Identifiers (property 0x0B, a variable byte integer, one per subscription the copy was
    sent for) among the PUBLISH properties in buf[i:end], skipping the others by their types; None when one is
    unknown, a subscription id is 0, or a property runs past `end`: paho reads that packet."""
    if end - i == 2 and buf[i] == SUBSCRIPTION_ID and 0 < buf[i + 1] < 0x80:
        return (buf[i + 1],)  # one id of one byte (a two-byte one, the usual, `_publish` reads itself)
    return _all_sub_ids(buf, i, end)


def _all_sub_ids(buf: bytes, i: int, end: int) -> tuple[int, ...] | None:
    """`_sub_ids` for any list of properties: each read by its type."""
    ids: list[int] = []
    while i < end:
        ident = buf[i]
        i += 1
        if ident == SUBSCRIPTION_ID:
            v = _remaining(buf, i, end)
            if v is None or not v[1]:
                return None
            i = v[0]
            ids.append(v[1])
        elif ident in _SKIP_FIXED:
            i += _SKIP_FIXED[ident]
        elif ident in _SKIP_STRINGS:
            for _ in range(_SKIP_STRINGS[ident]):
                if i + 2 > end:
                    return None
                i += 2 + (buf[i] << 8 | buf[i + 1])
        else:
            return None
    return tuple(ids) if i == end else None


def _remaining(buf: bytes, i: int, end: int) -> tuple[int, int] | None:
    """Decode an MQTT variable byte integer at buf[i:]: (index after it, value), or None if incomplete/bad."""
    value, shift = 0, 0
    while i < end and shift < 28:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return i, value
        shift += 7
    return None


def _varint(buf: bytearray, n: int) -> None:
    """MQTT "remaining length": 7 bits per byte, high bit = more bytes follow."""
    while True:
        byte, n = n & 0x7F, n >> 7
        if n:
            buf.append(byte | 0x80)
        else:
            buf.append(byte)
            return
