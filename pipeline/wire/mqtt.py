"""paho-mqtt clients driven by the stage's own loop (no paho thread).

A stage polls its ZeroMQ sockets and its MQTT sockets together in one `zmq.Poller` (`Hub`), so one thread
does everything: paho callbacks run inside `Hub.poll()` on the stage thread and may touch the stage's ZMQ
sockets, and no message crosses a thread. A `Link` reconnects with backoff (1 s doubling to 5 s, so a broker
back after an outage is in use within 5 s), re-subscribes on every connect, and sets TCP_NODELAY on its socket.

With `protocol: auto` a Link tries MQTT 5 and steps down to 3.1.1 when a connect fails after the TCP connection
was made: a CONNACK refusing the version (Mosquitto < 1.6 answers return code 1), a close before any CONNACK,
or no CONNACK in time (amqtt reads the properties of an MQTT 5 CONNECT as its client id and waits for ever). A
3.1.1 connect failing that way steps back up to 5, so a broker that is only unreachable is tried in both.
The version of an accepted connection is kept for the reconnects; it is logged once per change, and
`protocols` (stage snapshots, /rules) shows it. An embedded broker (amqtt) is spoken to in 3.1.1 only.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import paho.mqtt.client as mqtt
import zmq
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from pipeline.errors import ConfigError
from pipeline.wire.fastpaho import Deliver, FastClient

if TYPE_CHECKING:  # pipeline.config.load loads pydantic; a stage gets its config from pipeline.config.snapshot
    from pipeline.config.load import Broker

log = logging.getLogger("pipeline.mqtt")  # a stable name for log filters, not the module path

MAX_QUEUED = 20_000  # paho keys its queue by 16-bit mid: stay well below 65,535 (see docs/architecture.md)
MAX_INFLIGHT = 1000
RECEIVE_MAXIMUM = 10_000  # MQTT 5: QoS 1 messages a broker may send ingress before its PUBACKs (16-bit ids)
CONNECT_TIMEOUT = 3.0
MAX_BACKOFF = 5.0  # seconds between reconnect attempts at most (a local broker: retrying is cheap)
TICK = 0.1
SESSION_EXPIRY = 0xFFFFFFFF  # MQTT 5: a persistent session never expires, as clean_session=False does in 3.1.1
MAX_PACKET = 268_435_460  # bytes: the largest MQTT packet (a remaining length of 268,435,455 + its header)
REFUSED = "refusing the connection"  # state prefix after a failed CONNACK: /readyz shows the broker's reason
UNSUPPORTED_VERSION = 0x84  # CONNACK reason; paho reports a 3.1.1 broker's return code 1 to an MQTT 5 client so
SUB_IDS = 16_383  # subscription ids are 1..SUB_IDS: at most two bytes on the wire (see `subscription_id`)


class Link:
    """One MQTT connection. `state`: connecting, subscribing, connected, disconnected, stopped, subscription refused,
    or "refusing the connection (REASON)" (bad credentials, not authorised: retried like disconnected)."""

    def __init__(self, name: str, broker: Broker, client_id: str, *, clean_session: bool = True,
                 manual_ack: bool = False) -> None:
        self.name, self.broker = name, broker
        self.state = "disconnected"
        self.subscriptions: dict[str, int] = {}  # filter ($share/GROUP/ prefix included) -> QoS
        self.sub_ids: dict[str, int] = {}  # filter -> its MQTT 5 Subscription Identifier
        self._suback: dict[int, list[str]] = {}  # SUBSCRIBE packet id -> its filters, until their SUBACK
        self.connects = 0  # accepted connections
        self.malformed = 0  # connections closed because the broker sent a malformed packet
        # called on every CONNACK, before any message of the new connection is handled: packet ids of an
        # earlier connection mean nothing now (and the broker may re-send before our SUBACK arrives)
        self.on_connected: Callable[[Link], None] = lambda _link: None
        # every incoming PUBLISH (topic, payload, qos, mid, dup): read from the buffer without paho, or handed
        # over by paho when it read the packet. Only with manual_ack: the receiver acks what it is given.
        self.on_publish: Deliver | None = None
        # an incoming PUBLISH whose topic is not UTF-8 (MQTT forbids it; some brokers pass it on): the topic's
        # raw bytes, payload, qos, mid, dup. Without it such a message is dropped (a link that subscribes to
        # nothing never gets one).
        self.on_bad_topic: Callable[[bytes, bytes, int, int, bool], None] | None = None
        self.max_packet = min(MAX_PACKET, broker.max_packet_bytes or MAX_PACKET)  # MQTT 5: the broker says it too
        self._retry_at, self._backoff, self._since = 0.0, 1.0, 0.0
        self.auto = broker.protocol == "auto" and not broker.embedded  # may step between MQTT 5 and 3.1.1
        self.protocol = first_version(broker)  # of the next connect: "5" or "3.1.1"
        self.chosen: str | None = None  # the version of the last accepted connection
        self._clean = clean_session
        v5 = self.protocol == "5"  # MQTT 5 has no clean_session: clean_start and a session expiry instead
        c = self.client = FastClient(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                      clean_session=None if v5 else clean_session,
                                      protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311)
        c.connect_timeout = CONNECT_TIMEOUT
        c.manual_ack_set(manual_ack)
        if broker.username:
            c.username_pw_set(broker.username, broker.password.get_secret_value() if broker.password else None)
        if broker.scheme == "mqtts":
            _tls(c, name, broker)
        c.max_inflight_messages_set(MAX_INFLIGHT)
        c.max_queued_messages_set(MAX_QUEUED)
        c.on_socket_open = _nodelay
        c.on_connect, c.on_disconnect, c.on_subscribe = self._on_connect, self._on_disconnect, self._on_subscribe
        c.on_message = self._on_message
        # only records the target; the MQTT 5 session arguments are kept, and unused while speaking 3.1.1
        c.connect_async(broker.host, broker.port, broker.keepalive, **_session(clean_session))

    @property
    def connected(self) -> bool:
        return self.state == "connected"

    def subscribe(self, topic_filter: str, qos: int, share: str | None = None) -> None:
        """Remember a subscription; it is (re)made on every connect. `share`: an MQTT 5 shared subscription
        ($share/GROUP/filter): the broker gives each message to one member of the group. Messages still
        arrive with their own topic (no $share prefix), so routing matches them against the plain filter."""
        if share:
            topic_filter = f"$share/{share}/{topic_filter}"
        self.subscriptions[topic_filter] = max(qos, self.subscriptions.get(topic_filter, 0))
        taken: set[int] = set()
        for f in sorted(self.subscriptions):  # in one order whatever the order of the rules
            self.sub_ids[f] = subscription_id(f, taken)
            taken.add(self.sub_ids[f])

    def fileno(self) -> int | None:
        sock = self.client.socket()
        return sock.fileno() if sock is not None else None

    def tick(self, now: float) -> None:
        """Keepalive, connect timeout and reconnect; call about every TICK seconds."""
        if self.state in ("stopped",):
            return
        if self.state == "disconnected" or self.state.startswith(REFUSED):
            if now >= self._retry_at:
                self._connect(now)
            return
        if self.state == "connecting" and now - self._since > CONNECT_TIMEOUT + 2:
            self._no_connack(now, f"no CONNACK within {CONNECT_TIMEOUT + 2:g} s")
            return
        if self.client.loop_misc() != mqtt.MQTT_ERR_SUCCESS and self.state != "disconnected":
            self._lost(now, "keepalive")

    def read(self, max_packets: int = 256) -> None:
        """Handle what the socket has (see `FastClient.read`): PUBLISH packets go to `on_publish` when set."""
        if self.client.read(self.on_publish, max_packets):
            return
        if self.client.read_error == mqtt.MQTT_ERR_PROTOCOL:  # paho closed the connection on it (MQTT 4.8)
            self.malformed += 1
            log.warning("broker %s sent a malformed packet (%d so far); reconnecting", self.name, self.malformed)
        if self.state not in ("disconnected", "stopped"):
            self._lost(time.monotonic(), "read failed")

    def write(self) -> None:
        """Hand paho's queued packets to the socket in as few send() calls as possible."""
        c = self.client
        if c.want_write() and c.loop_write() != mqtt.MQTT_ERR_SUCCESS:
            if self.state not in ("disconnected", "stopped"):
                self._lost(time.monotonic(), "write failed")
            return
        try:
            c.flush()
        except OSError as e:
            if self.state not in ("disconnected", "stopped"):
                self._lost(time.monotonic(), f"write failed: {e}")

    def wants_write(self) -> bool:
        return self.client.want_write() or self.client.unflushed()

    def stop(self) -> None:
        was, self.state = self.state, "stopped"
        if was != "disconnected":
            self.client.disconnect()
            self.write()
        sock = self.client.socket()
        if sock is not None:
            sock.close()

    def _connect(self, now: float) -> None:
        self.state, self._since = "connecting", now
        try:
            self.client.reconnect()
        except (OSError, ssl.SSLError) as e:
            self._lost(now, f"{self.broker.host}:{self.broker.port}: {e}")

    def _lost(self, now: float, why: str) -> None:
        if self.state.startswith(REFUSED):
            return  # the broker closes the socket after refusing us: already handled
        if self.state == "connected":
            log.warning("lost broker %s (%s); reconnecting", self.name, why)
        elif self._backoff == 1.0:
            log.warning("cannot reach broker %s (%s); retrying with backoff", self.name, why)
        self.state = "disconnected"
        self._retry_at, self._backoff = now + self._backoff, min(self._backoff * 2, MAX_BACKOFF)

    def _no_connack(self, now: float, why: str) -> None:
        """A connection that never got its CONNACK: lost, with its likely causes; with auto, the next connect
        speaks the other version."""
        if self.auto and self.protocol == "5":  # likely a broker that speaks only 3.1.1: no warning yet
            self._switch(now, why)
            return
        hints = ["a TLS port? then use mqtts://"] if self.broker.scheme == "mqtt" else []
        if self.broker.protocol == "5":  # amqtt, Mosquitto < 1.6: no answer, or a close, to an MQTT 5 CONNECT
            hints.append('a broker that speaks only MQTT 3.1.1? then set protocol: "3.1.1"')
        self._lost(now, f"{why} ({'; '.join(hints)})" if hints else why)
        if self.auto:
            self._switch(now, why)

    def _switch(self, now: float, why: str) -> None:
        """auto: the next connect speaks the other MQTT version: at once when stepping down to 3.1.1, after the
        backoff when stepping back up (a broker that fails both is retried no faster than any other)."""
        was, self.protocol = self.protocol, "3.1.1" if self.protocol == "5" else "5"
        self.client.use_protocol(mqtt.MQTTv5 if self.protocol == "5" else mqtt.MQTTv311, self._clean)
        log.info("broker %s: MQTT %s connect failed (%s); trying MQTT %s", self.name, was, why, self.protocol)
        if self.protocol == "3.1.1":  # the backoff is left as it was: the 3.1.1 connect warns as any other would
            self.state, self._retry_at = "disconnected", now
        elif self.state != "disconnected":  # refused by CONNACK (a failed connect already took its backoff)
            self.state, self._retry_at = "disconnected", now + self._backoff
            self._backoff = min(self._backoff * 2, MAX_BACKOFF)

    def _on_connect(self, client: mqtt.Client, _u: object, _f: object, rc: mqtt.ReasonCode, props: object) -> None:
        said = getattr(props, "MaximumPacketSize", None)  # MQTT 5 CONNACK: the largest packet the broker takes
        self.max_packet = min(MAX_PACKET, self.broker.max_packet_bytes or MAX_PACKET, said or MAX_PACKET)
        if rc.is_failure and self.auto and rc.value == UNSUPPORTED_VERSION:
            self._switch(time.monotonic(), f"the broker refused it: {rc}")  # it closes the socket: nothing to do
            return
        if rc.is_failure:
            log.error("broker %s refused the connection: %s", self.name, rc)
            self._lost(time.monotonic(), str(rc))
            self.state = f"{REFUSED} ({rc})"
            return
        self._backoff = 1.0
        self.connects += 1
        log.info("connected to broker %s (%s:%s, MQTT %s)", self.name, self.broker.host, self.broker.port,
                 self.protocol)
        if self.auto and self.chosen != self.protocol:
            log.info("broker %s: MQTT %s chosen (protocol: auto)", self.name, self.protocol)
        self.chosen = self.protocol
        self.on_connected(self)
        shared = [f for f in self.subscriptions if f.startswith("$share/")]
        if shared and self.protocol != "5":
            self.state = "subscription refused"
            log.error("broker %s speaks only MQTT 3.1.1: not subscribing, %s needs MQTT 5", self.name, shared[0])
            return
        if self.subscriptions:
            self.state = "subscribing"  # "connected" once the broker acknowledged every subscription
            self._subscribe(client)
        else:
            self._up()

    def _subscribe(self, client: mqtt.Client) -> None:
        """Every subscription: MQTT 3.1.1 in one SUBSCRIBE; MQTT 5 one SUBSCRIBE per filter, each with its
        Subscription Identifier (a SUBSCRIBE carries one), so that each copy of a message says which
        subscription it was sent for (a broker may send one copy per matching subscription)."""
        self._suback.clear()
        if self.protocol != "5":
            _rc, mid = client.subscribe(list(self.subscriptions.items()))
            self._suback[mid] = list(self.subscriptions)
            return
        for f, qos in self.subscriptions.items():
            props = Properties(PacketTypes.SUBSCRIBE)
            props.SubscriptionIdentifier = self.sub_ids[f]
            _rc, mid = client.subscribe(f, options=SubscribeOptions(qos=qos), properties=props)
            self._suback[mid] = [f]

    def _on_message(self, _c: mqtt.Client, _u: object, m: mqtt.MQTTMessage) -> None:
        """A PUBLISH paho read itself (split across reads, or not for the fast path): the same delivery. A topic
        that is not UTF-8 (the fast path leaves those to paho) goes to `on_bad_topic`, with its raw bytes:
        paho raises on `m.topic` and keeps them in `m._topic` (paho-mqtt 2.x; tests/hostile checks it)."""
        try:
            topic = m.topic
        except UnicodeDecodeError:
            if self.on_bad_topic is not None:
                self.on_bad_topic(bytes(m._topic), m.payload, m.qos, m.mid, m.dup)
            return
        if self.on_publish is not None:
            subs = getattr(m.properties, "SubscriptionIdentifier", None) or ()  # MQTT 5: a list (paho)
            self.on_publish(topic, m.payload, m.qos, m.mid, m.dup, tuple(subs))

    def _on_subscribe(self, _c: mqtt.Client, _u: object, mid: int, codes: list[mqtt.ReasonCode], _p: object) -> None:
        filters = self._suback.pop(mid, None)
        if filters is None or self.state != "subscribing":
            return  # a SUBACK of an earlier connection, or after a refusal
        refused = [f for f, rc in zip(filters, codes, strict=False) if rc.is_failure]
        if refused:
            self.state = "subscription refused"
            log.error("broker %s refused the subscription to %s", self.name, ", ".join(refused))
            return
        if self._suback:
            return  # more SUBACKs to come
        log.info("subscribed on broker %s to %s", self.name, ", ".join(self.subscriptions))
        self._up()

    def _up(self) -> None:
        self.state = "connected"

    def _on_disconnect(self, _c: mqtt.Client, _u: object, _f: object, rc: mqtt.ReasonCode, _p: object) -> None:
        if self.state == "connecting":
            self._no_connack(time.monotonic(), f"{rc}: the broker closed the connection before CONNACK")
        elif self.state not in ("stopped", "disconnected") and not self.state.startswith(REFUSED):
            self._lost(time.monotonic(), str(rc))


class Hub:
    """One poller for a stage's ZMQ sockets and MQTT links."""

    def __init__(self, links: list[Link]) -> None:
        self.links = links
        self.reading = True  # False: leave MQTT input unread (draining before a stop)
        self.poller = zmq.Poller()
        self._fds: dict[int, Link] = {}
        self._wanted: tuple[tuple[int, int], ...] = ()
        self._next_tick = 0.0

    def register(self, sock: zmq.Socket) -> None:
        self.poller.register(sock, zmq.POLLIN)

    def unregister(self, sock: zmq.Socket) -> None:
        self.poller.unregister(sock)

    def poll(self, timeout_ms: int) -> set[zmq.Socket]:
        """Wait for input; serve MQTT reads/writes (callbacks run here); return readable ZMQ sockets."""
        self._sync()
        events = self.poller.poll(timeout_ms)
        ready = set()
        for sock, ev in events:
            link = self._fds.get(sock) if isinstance(sock, int) else None
            if link is None:
                ready.add(sock)
                continue
            if ev & zmq.POLLIN:
                link.read()
            if ev & zmq.POLLOUT:
                link.write()
        now = time.monotonic()
        if now >= self._next_tick:
            self._next_tick = now + TICK
            for link in self.links:
                link.tick(now)
        return ready

    def flush(self) -> None:
        for link in self.links:
            link.write()

    def _sync(self) -> None:
        """(Re)register link sockets when their fd or the interest in writing changed (cheap when not)."""
        wanted = tuple((fd, (zmq.POLLIN if self.reading else 0) | (zmq.POLLOUT if link.wants_write() else 0))
                       for link in self.links if (fd := link.fileno()) is not None)
        if wanted == self._wanted:
            return
        for fd in self._fds.keys() - {fd for fd, flags in wanted if flags}:
            self.poller.unregister(fd)
        self._fds = {}
        for (fd, flags), link in zip(wanted, [lk for lk in self.links if lk.fileno() is not None], strict=True):
            if flags:
                self.poller.register(fd, flags)
                self._fds[fd] = link
        self._wanted = wanted


def subscription_id(topic_filter: str, taken: set[int]) -> int:
    """The Subscription Identifier of a filter: derived from the filter itself, so it is the same in every run
    (a persistent session keeps queued copies with the ids they were sent for, and a restart with other rules
    must not read them as another filter's); the next free one after `taken` when two filters of a link meet."""
    sid = zlib.crc32(topic_filter.encode()) % SUB_IDS + 1
    while sid in taken:
        sid = sid % SUB_IDS + 1
    return sid


def first_version(broker: Broker) -> str:
    """The MQTT version a Link speaks first: auto tries 5, except with the embedded broker (amqtt: 3.1.1 only)."""
    if broker.protocol == "auto":
        return "3.1.1" if broker.embedded else "5"
    return broker.protocol


def _nodelay(_client: mqtt.Client, _userdata: object, sock: socket.socket) -> None:
    # paho never sets TCP_NODELAY: without it Nagle adds ~40 ms stalls to small publishes.
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:  # not a TCP socket (unix socket, websocket wrapper)
        pass


def _tls(client: mqtt.Client, name: str, broker: Broker) -> None:
    """TLS that checks the broker's certificate (against `ca`, else the system CAs) and, unless `insecure`,
    that it names the host; a client certificate when `cert` is given."""
    try:
        client.tls_set(*(str(f) if f else None for f in (broker.ca, broker.cert, broker.key)),
                       cert_reqs=ssl.CERT_REQUIRED)
    except (OSError, ValueError) as e:  # ssl.SSLError is an OSError: unreadable file, key not matching the cert
        raise ConfigError(f"brokers.{name}", [f"cannot use the TLS files (ca, cert, key): {e}"]) from None
    if broker.insecure:
        client.tls_insecure_set(True)
        log.warning("broker %s: insecure: true, the certificate's host name is not checked", name)


def _session(clean: bool) -> dict[str, object]:
    """MQTT 5 connect arguments equivalent to 3.1.1's clean_session: a persistent session (clean=False) resumes
    on reconnect and outlives the connection (session expiry); a clean one starts afresh and ends with it.
    Receive Maximum: without it Mosquitto sends a client at most `max_inflight_messages` (20) unacknowledged
    QoS 1 messages and queues `max_queued_messages` (1,000) more, then drops what comes next for that client.
    Ingress acks only once the result is safe, in arrival order, so the window must cover what the pipeline holds
    while ingress or egress is held up: as large as a rule's default backlog, not a fraction of it."""
    props = Properties(PacketTypes.CONNECT)
    props.ReceiveMaximum = RECEIVE_MAXIMUM
    if not clean:
        props.SessionExpiryInterval = SESSION_EXPIRY
    return {"clean_start": clean, "properties": props}
