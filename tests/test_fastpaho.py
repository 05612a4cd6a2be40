"""FastClient writes QoS 0 PUBLISH and PUBACK packets itself: they must be byte for byte what paho sends."""

from __future__ import annotations

import socket
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from conftest import free_port
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from pipeline.wire.fastpaho import PAHO_CHECKED, FastClient, missing_internals


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


def _publish_packet(protocol: int, topic: str, payload: bytes, qos: int, mid: int, dup: bool = False,
                    props: Properties | None = None) -> bytes:
    """A PUBLISH as a broker sends it, built by paho's own encoder."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=protocol)
    a, b = socket.socketpair()
    c._sock = a
    packets: list[bytes] = []
    c._packet_queue = lambda _cmd, packet, _mid, _qos, _info=None: packets.append(bytes(packet)) or 0
    c._send_publish(mid, topic.encode(), payload, qos, False, dup, properties=props)
    b.close()
    return packets[0]


def _reader(protocol: int, data: bytes) -> FastClient:
    c = FastClient(mqtt.CallbackAPIVersion.VERSION2, protocol=protocol)
    c._sock, peer = socket.socketpair()  # take_publishes needs a connection; it reads only the buffer
    peer.close()
    c._rbuf, c._rpos = data, 0
    return c


@pytest.mark.parametrize("protocol", [mqtt.MQTTv311, mqtt.MQTTv5])
def test_take_publishes_reads_what_paho_would(protocol):
    sent = [("plant/dévice/t", b"", 0, 0, False), ("a/b", b"x" * 200, 1, 7, False),
            ("a/c", bytes(range(256)) * 70, 1, 65535, True), ("z", b"{}", 0, 0, False)]
    data = b"".join(_publish_packet(protocol, *m) for m in sent)
    got: list[tuple] = []
    c = _reader(protocol, data)
    assert c.take_publishes(lambda *m: got.append(m)) == 4
    assert got == [(*m, ()) for m in sent] and not c.buffered()  # no subscription ids


def _props(**values: object) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    for name, value in values.items():
        setattr(props, name, value)
    return props


OTHERS = {"PayloadFormatIndicator": 1, "MessageExpiryInterval": 60, "ContentType": "application/json",
          "ResponseTopic": "re/ply", "CorrelationData": b"\x00\xffcorr"}
SUB_ID_CASES = [  # (properties, the subscription ids the fast path must read)
    ({}, ()),
    ({"SubscriptionIdentifier": 5}, (5,)),
    ({"SubscriptionIdentifier": 300}, (300,)),  # two bytes
    ({"SubscriptionIdentifier": 268_435_455}, (268_435_455,)),  # the largest: four bytes
    ({"SubscriptionIdentifier": [3, 200]}, (3, 200)),  # one copy for two subscriptions
    ({**OTHERS, "SubscriptionIdentifier": 7}, (7,)),  # paho writes them before the id
    ({"SubscriptionIdentifier": 9, "UserProperty": [("k", "v"), ("ké", "")]}, (9,)),
    ({**OTHERS, "UserProperty": ("k", "v")}, ()),
]


@pytest.mark.parametrize(("values", "ids"), SUB_ID_CASES)
def test_take_publishes_reads_the_subscription_ids_and_skips_the_other_properties(values, ids):
    sent = ("in/d1/data", b'{"seq": 1}', 1, 42, False)
    data = _publish_packet(mqtt.MQTTv5, *sent, props=_props(**values))
    got: list[tuple] = []
    c = _reader(mqtt.MQTTv5, data + data)
    assert c.take_publishes(lambda *m: got.append(m)) == 2
    assert got == [(*sent, ids)] * 2 and not c.buffered()


@pytest.mark.parametrize(("name", "props"), [
    ("a user property longer than the properties", b"\x26\x00\x09k\x00\x01v"),
    ("a content type past the properties", b"\x0b\x01\x03\x00\x05ab"),
    ("a four-byte integer cut short", b"\x0b\x01\x02\x00\x00"),
    ("a subscription id cut short", b"\x0b\x81"),
    ("subscription id 0", b"\x0b\x00"),
    ("an unknown property", b"\x0b\x01\x7f\x00"),
    ("a topic alias property's id only", b"\x23"),
])
def test_properties_the_fast_path_cannot_read_are_left_to_paho(name, props):
    body = b"\x00\x01t" + b"\x00\x07" + bytes([len(props)]) + props + b"payload"
    c = _reader(mqtt.MQTTv5, bytes([0x32, len(body)]) + body)
    got: list[tuple] = []
    assert c.take_publishes(lambda *m: got.append(m)) == 0 and got == [] and c._rpos == 0, name


def test_a_publish_paho_reads_itself_still_carries_its_subscription_ids():
    """A packet larger than one read is paho's to read; Link hands it over with the same ids."""
    from pipeline.config.load import Broker
    from pipeline.wire.mqtt import Link

    link = Link("t", Broker(url="mqtt://127.0.0.1:1", protocol="5"), "slow-path", manual_ack=True)
    got: list[tuple] = []
    link.on_publish = lambda *m: got.append(m)
    payload = b"x" * 300_000  # over FastClient.READ_SIZE
    data = _publish_packet(mqtt.MQTTv5, "a/b", payload, 1, 9, props=_props(SubscriptionIdentifier=[4, 700]))
    c = link.client
    c._sock, peer = socket.socketpair()
    c._sock.setblocking(False)
    c._state = mqtt._ConnectionState.MQTT_CS_CONNECTED
    sender = threading.Thread(target=peer.sendall, args=(data,))
    sender.start()
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        c.read(link.on_publish)
    sender.join()
    peer.close()
    c._sock.close()
    assert got == [("a/b", payload, 1, 9, False, (4, 700))]


def test_take_publishes_stops_at_other_packets_partial_packets_and_its_limit():
    one = _publish_packet(mqtt.MQTTv311, "t", b"p", 1, 1)
    pingresp, got = b"\xd0\x00", []
    c = _reader(mqtt.MQTTv311, one + pingresp + one)
    assert c.take_publishes(lambda *m: got.append(m)) == 1 and c._rpos == len(one)  # paho reads the PINGRESP
    c = _reader(mqtt.MQTTv311, one + one[:-1])
    assert c.take_publishes(lambda *m: got.append(m)) == 1 and c._rpos == len(one)  # the rest comes later
    c = _reader(mqtt.MQTTv311, one * 5)
    assert c.take_publishes(lambda *m: got.append(m), limit=3) == 3 and c._rpos == 3 * len(one)
    qos2 = _publish_packet(mqtt.MQTTv311, "t", b"p", 2, 9)
    c = _reader(mqtt.MQTTv311, qos2)
    assert c.take_publishes(lambda *m: got.append(m)) == 0 and c._rpos == 0
    c = _reader(mqtt.MQTTv311, one)
    c._in_packet["command"] = 0x30  # paho is in the middle of a packet: not ours to read
    assert c.take_publishes(lambda *m: got.append(m)) == 0
    assert len(got) == 5


def test_fill_reads_once_the_buffer_is_consumed_and_leaves_a_closed_connection_to_paho():
    c = FastClient(mqtt.CallbackAPIVersion.VERSION2)
    c._sock, peer = socket.socketpair()
    c._sock.setblocking(False)
    assert c.fill() is False  # nothing there
    peer.sendall(b"abc")
    assert c.fill() is True and c._rbuf == b"abc"
    peer.sendall(b"def")
    assert c.fill() is True and c._rbuf == b"abc"  # not consumed yet: no recv
    c._rpos = 3
    assert c.fill() is True and c._rbuf == b"def"
    c._rpos = 3
    peer.close()
    assert c.fill() is True and not c.buffered()  # closed: paho's own read reports it
    assert c.loop_read() != mqtt.MQTT_ERR_SUCCESS


def test_qos1_publishes_beyond_the_inflight_window_still_go_out_as_pubacks_arrive():
    """_update_inflight skips paho's walk only when nothing is queued: queued messages must still be sent."""
    c = FastClient(mqtt.CallbackAPIVersion.VERSION2)
    c.max_inflight_messages_set(2)
    c._sock, peer = socket.socketpair()
    c._sock.setblocking(False)
    c._state = mqtt._ConnectionState.MQTT_CS_CONNECTED
    infos = [c.publish("t", b"%d" % i, 1) for i in range(4)]
    assert c._inflight_messages == 2 and len(c._out_messages) == 4
    assert [c._out_messages[i.mid].state for i in infos[2:]] == [mqtt.mqtt_ms_queued] * 2
    for mid in (infos[0].mid, infos[1].mid):  # PUBACKs for the two in flight
        c._rbuf, c._rpos = bytes((0x40, 2, mid >> 8, mid & 0xFF)), 0
        assert c.loop_read() == mqtt.MQTT_ERR_SUCCESS
    assert [i.is_published() for i in infos] == [True, True, False, False]
    assert c._inflight_messages == 2 and len(c._out_messages) == 2
    assert [c._out_messages[i.mid].state for i in infos[2:]] == [mqtt.mqtt_ms_wait_for_puback] * 2  # sent
    peer.close()
    c._sock.close()


@pytest.mark.parametrize("protocol", [mqtt.MQTTv311, mqtt.MQTTv5])
@pytest.mark.parametrize("size", [0, 127, 16_384])
@pytest.mark.parametrize("retain", [False, True])
def test_publish1_matches_paho_and_its_puback_comes_back_through_take_publishes(protocol, size, retain):
    c = FastClient(mqtt.CallbackAPIVersion.VERSION2, protocol=protocol)
    c.is_connected = lambda: True
    payload = b"p" * size
    mid = c.publish1("plant/dévice/alarm", payload, retain)
    expected = _publish_packet(protocol, "plant/dévice/alarm", payload, 1, mid)
    if retain:
        expected = bytes([expected[0] | 1]) + expected[1:]  # the retain bit
    assert mid == 1 and bytes(c._wbuf) == expected
    c._sock, peer = socket.socketpair()
    peer.close()
    acks: list[tuple[int, int]] = []
    puback5 = b"\x40\x04\x00\x01\x10\x00"  # MQTT 5 long form: reason 0x10 (no matching subscribers), no props
    refused = b"\x40\x03\x00\x02\x87"  # reason 0x87: not authorized
    c._rbuf, c._rpos = b"\x40\x02\x00\x01" + puback5 + refused + b"\xd0\x00", 0
    assert c.take_publishes(None, on_puback=lambda *a: acks.append(a)) == 3
    assert acks == [(1, 0), (1, 0x10), (2, 0x87)]
    assert c._rpos == 15  # the PINGRESP is paho's
    c.is_connected = lambda: False
    assert c.publish1("t", b"x") == 0


def test_a_puback_split_across_two_reads_still_reaches_on_puback():
    c = FastClient(mqtt.CallbackAPIVersion.VERSION2)
    c._sock, peer = socket.socketpair()
    c._sock.setblocking(False)
    c._state = mqtt._ConnectionState.MQTT_CS_CONNECTED
    acks: list[tuple[int, int]] = []
    c.on_puback = lambda *a: acks.append(a)
    c._rbuf, c._rpos = b"\x40\x02\x12", 0  # the first three bytes of a PUBACK for mid 0x1234
    assert c.take_publishes(None, on_puback=c.on_puback) == 0  # incomplete: paho's reader takes it
    peer.sendall(b"\x34")
    assert c.loop_read() == mqtt.MQTT_ERR_SUCCESS and acks == [(0x1234, 0)]
    peer.close()
    c._sock.close()


@pytest.mark.parametrize(("protocol", "in_flight"), [("3.1.1", 20), ("5", 2000)])
def test_an_mqtt5_link_asks_mosquitto_for_more_than_20_unacked_messages(broker, protocol, in_flight):
    """Mosquitto's default max_inflight_messages (20) holds back the rest of a slow acker's QoS 1 input, and
    past max_queued_messages (1,000) drops it; over MQTT 5 a Link asks for a Receive Maximum of
    RECEIVE_MAXIMUM instead, so 2,000 unacknowledged messages all arrive."""
    from pipeline.config.load import Broker
    from pipeline.wire.mqtt import Hub, Link

    got: list[int] = []
    link = Link("t", Broker(url=broker.url, protocol=protocol), f"rmax-{protocol}", manual_ack=True)
    link.subscribe(f"rmax/{protocol}", 1)
    link.on_publish = lambda _t, _p, _q, mid, _d, _s: got.append(mid)  # never acked
    hub = Hub([link])
    deadline = time.monotonic() + 5
    while not link.connected and time.monotonic() < deadline:
        hub.poll(20)
        hub.flush()
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    try:
        for _ in range(2000):
            pub.publish(f"rmax/{protocol}", b"x", 1)
        deadline, extra = time.monotonic() + 5, 0.0
        while time.monotonic() < deadline:  # until in_flight arrived, then half a second for any beyond it
            if len(got) >= in_flight and not extra:
                extra, deadline = 1, time.monotonic() + 0.5
            hub.poll(20)
            hub.flush()
        assert len(got) == in_flight
    finally:
        pub.loop_stop()
        link.stop()


def test_an_mqtt5_link_to_a_broker_that_speaks_only_311_says_what_to_set(caplog):
    """amqtt (the embedded broker) speaks MQTT 3.1.1 only and never answers an MQTT 5 CONNECT: the log says
    what to set instead of only "cannot reach"."""
    from pipeline.commands import broker as embedded
    from pipeline.config.load import Broker
    from pipeline.wire.mqtt import Hub, Link

    port, stop = free_port(), threading.Event()
    server = threading.Thread(target=embedded.run, args=("127.0.0.1", port, stop), daemon=True)
    server.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # listening?
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    link = Link("old", Broker(url=f"mqtt://127.0.0.1:{port}", protocol="5"), "v5-to-311")
    hub = Hub([link])
    try:
        deadline = time.monotonic() + 15
        while "cannot reach broker old" not in caplog.text and time.monotonic() < deadline:
            hub.poll(50)
        assert 'a broker that speaks only MQTT 3.1.1? then set protocol: "3.1.1"' in caplog.text
        assert not link.connected
    finally:
        link.stop()
        stop.set()
        server.join(5)


MALFORMED = [  # PUBLISH packets a broker must never send: each closes the connection, none raises or delivers
    ("remaining length 0", b"\x30\x00"),
    ("remaining length 1", b"\x32\x01\x00"),
    ("QoS 1, length 0", b"\x32\x00"),
    ("topic longer than the packet", b"\x30\x03\x00\x05a"),
    ("QoS 1 without its packet id", b"\x32\x03\x00\x01a"),
    ("QoS 3", b"\x36\x03\x00\x01a"),
    ("a remaining length of five bytes", b"\x30\xff\xff\xff\xff\x7f"),
    ("reserved packet type 0", b"\x00\x00"),
]


def _connected_reader(protocol: int, data: bytes) -> FastClient:
    c = FastClient(mqtt.CallbackAPIVersion.VERSION2, protocol=protocol)
    c._sock, peer = socket.socketpair()
    c._sock.setblocking(False)
    c._state = mqtt._ConnectionState.MQTT_CS_CONNECTED
    peer.sendall(data)
    peer.close()
    return c


@pytest.mark.parametrize("protocol", [mqtt.MQTTv311, mqtt.MQTTv5])
@pytest.mark.parametrize(("name", "packet"), MALFORMED + [
    ("MQTT 3.1.1: an empty topic", b"\x30\x02\x00\x00"),
])
def test_a_malformed_publish_closes_the_connection_and_delivers_nothing(protocol, name, packet):
    got: list[tuple] = []
    c = _connected_reader(protocol, packet)
    if protocol == mqtt.MQTTv5 and name.startswith("MQTT 3.1.1"):
        packet = b"\x30\x03\x00\x00\x00"  # MQTT 5 allows an empty topic with an alias only: paho's to judge
    assert c.read(lambda *m: got.append(m)) is False
    assert got == [] and c.read_error == mqtt.MQTT_ERR_PROTOCOL


def test_mqtt5_properties_that_run_past_the_packet_are_not_read_as_payload():
    got: list[tuple] = []
    c = _connected_reader(mqtt.MQTTv5, b"\x30\x05\x00\x01a\x7fX")  # property length 127 in a 5-byte packet
    assert c.read(lambda *m: got.append(m)) is False and got == []
    c = _connected_reader(mqtt.MQTTv5, b"\x32\x08\x00\x01a\x00\x01\x10XY")
    assert c.read(lambda *m: got.append(m)) is False and got == []


def test_the_paho_internals_fastclient_relies_on_are_there():
    from importlib.metadata import version

    missing = missing_internals()
    assert not missing, (f"paho-mqtt {version('paho-mqtt')} lacks {', '.join(missing)}, which FastClient "
                         f"(pipeline/wire/fastpaho.py) overrides or reads: it was written for paho-mqtt "
                         f"{PAHO_CHECKED}.x, the version setup.cfg pins")
