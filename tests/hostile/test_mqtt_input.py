"""What a broker may send ingress that MQTT forbids: malformed PUBLISH packets and topics that are not UTF-8
(EMQX passes those on). Fed by a raw-socket broker of the test's own; results go to a real Mosquitto. Ingress
stays up, counts each case, and every genuine message of the run comes out."""

from __future__ import annotations

import base64
import time

import orjson
from conftest import processes
from fakebroker import FakeBroker, Wait, publish

CONFIG = """
brokers:
  odd: {url: FAKE, protocol: "3.1.1"}  # the scripts are 3.1.1 packets
  local: {url: LOCAL}
models:
  probe: {path: MODELS/probe}
rules:
  - name: h
    sub: {broker: odd, topic: "h/#", qos: 1}
    model: probe
    pub: {broker: local, topic: out/h, qos: 1}
control: {listen: CONTROL}
"""

# each closes the connection it comes on (MQTT 4.8: a malformed packet is a protocol error)
MALFORMED = {
    "PUBLISH of remaining length 0": b"\x30\x00",
    "QoS 1 PUBLISH of remaining length 1": b"\x32\x01\x00",
    "a topic longer than the packet": b"\x30\x03\x00\x05a",
    "QoS 1 without its packet id": b"\x32\x03\x00\x01a",
    "QoS 3": b"\x36\x03\x00\x01a",
    "an empty topic (MQTT 3.1.1)": b"\x32\x04\x00\x00\x00\x09",
    "a remaining length of five bytes": b"\x30\xff\xff\xff\xff\x7f",
}
BAD_TOPIC = b"h/\xff\xfe"


def stage_pid(up, stage: str) -> int:
    """The pid of the stack's `pipeline STAGE` process."""
    pids = [pid for pid, cmd in processes().items() if f"pipeline {stage} " in cmd and str(up.run_dir) in cmd]
    assert len(pids) == 1, pids
    return pids[0]


def test_malformed_packets_and_non_utf8_topics(broker, probe_factory, stack_factory):
    first = [publish(BAD_TOPIC, b'{"seq": 1}', 1, 7), publish(b"h/ok", b'{"seq": 2}', 1, 8), Wait({7, 8}),
             MALFORMED["PUBLISH of remaining length 0"]]
    scripts = [first] + [[packet] for packet in list(MALFORMED.values())[1:]] + \
        [[publish(b"h/last", b'{"seq": 3}', 1, 9), Wait({9})]]
    fake = FakeBroker(scripts)
    probe = probe_factory("out/h", "pipeline/errors/#")
    try:
        up = stack_factory(CONFIG.replace("FAKE", fake.url).replace("LOCAL", broker.url))
        ingress = stage_pid(up, "ingress")
        outputs = probe.wait_for(3, timeout=60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(fake.connections) < len(scripts):
            time.sleep(0.1)
        last = fake.connections[len(scripts) - 1]
        while time.monotonic() < deadline and 9 not in last.pubacks:
            time.sleep(0.1)
    finally:
        fake.stop()
    assert fake.connections[0].pubacks[:2] == [7, 8]  # the bad topic is acked too, in order
    assert last.pubacks == [9]
    results = sorted(orjson.loads(p)["seq"] for t, p in outputs if t == "out/h")
    assert results == [2, 3]
    records = [orjson.loads(p) for t, p in outputs if t == "pipeline/errors/h"]
    assert len(records) == 1
    record = records[0]
    assert record["reason"] == "bad_topic" and record["topic_encoding"] == "base64"
    assert base64.b64decode(record["topic"]) == BAD_TOPIC and record["payload"] == '{"seq": 1}'
    assert stage_pid(up, "ingress") == ingress  # never restarted
    doc = next(s for s in up.get("/stages")[1]["stages"] if s["name"] == "ingress")
    assert doc["counters"].get("bad_topic") == 1
    assert doc["counters"].get("malformed_packets") == len(MALFORMED)
