"""Results the broker will never take must not block the outbox: a result over the broker's packet size (told
by the MQTT 5 broker, or configured for MQTT 3.1.1) becomes an error record; rows an earlier run left that no
broker takes are set aside; a PUBACK that refuses for now (0x97 quota exceeded) is retried. Every genuine
result of the run comes out and egress never restarts."""

from __future__ import annotations

import sqlite3
import time

import orjson
import pytest
from conftest import Mosquitto, Probe
from fakebroker import FakeBroker
from test_mqtt_input import stage_pid

CONFIG = """
brokers:
  local: {url: LOCAL, protocol: "PROTOCOL"LIMIT}
models:
  probe: {path: MODELS/probe}
rules:
  - name: big
    sub: {broker: local, topic: "in/+", qos: 1}
    model: probe
    pub: {broker: local, topic: "out/{1}", qos: 1}
control: {listen: CONTROL}
"""


@pytest.fixture
def small_broker(tmp_path):
    (tmp_path / "mosquitto").mkdir()
    m = Mosquitto(tmp_path / "mosquitto", extra=("max_packet_size 4096",))
    m.start()
    yield m
    m.stop()


def egress_of(up) -> dict:
    return next(s for s in up.get("/stages")[1]["stages"] if s["name"] == "egress")


@pytest.mark.parametrize(("protocol", "limit"), [("5", ""), ("3.1.1", ", max_packet_bytes: 4096")])
def test_a_result_over_the_packet_size_becomes_an_error_record(small_broker, stack_factory, protocol, limit):
    text = CONFIG.replace("LOCAL", small_broker.url).replace("PROTOCOL", protocol).replace("LIMIT", limit)
    up = stack_factory(text)
    egress = stage_pid(up, "egress")
    probe = Probe(small_broker.port, "out/#", "pipeline/errors/#")
    try:
        for seq in range(40):
            probe.publish(f"in/d{seq}", {"seq": seq, "pad": 6000 if seq % 10 == 3 else 10})
        got = probe.wait_for(40, timeout=30)
    finally:
        probe.close()
    outputs = sorted(orjson.loads(p)["seq"] for t, p in got if t.startswith("out/"))
    records = [orjson.loads(p) for t, p in got if t.startswith("pipeline/errors/")]
    assert outputs == [s for s in range(40) if s % 10 != 3]
    assert sorted(r["reason"] for r in records) == ["unpublishable_result"] * 4
    assert all("over what broker local takes (4096 bytes" in r["error"] and r["payload_truncated"] for r in records)
    assert stage_pid(up, "egress") == egress
    time.sleep(1.0)
    doc = egress_of(up)
    assert doc["counters"].get("unpublishable") == 4 and doc["depth"] == 0


def test_rows_no_broker_takes_left_by_an_earlier_run_are_set_aside(broker, stack_factory, probe_factory, tmp_path):
    from pipeline.stages.egress.outbox import Outbox

    data = tmp_path / "data"
    outbox = Outbox(data / "outbox.sqlite3", 1 << 20)  # the schema, as egress makes it
    outbox.close()
    db = sqlite3.connect(data / "outbox.sqlite3")
    poison = [("local", "out/text", "stored as text", 1, 0, "big", 1.0), ("local", "a/+/out", b"{}", 1, 0, "big", 1.0),
              ("local", "", b"{}", 1, 0, "big", 1.0), ("local", "out/fine", b'{"seq": -1}', 1, 0, "big", 1.0)]
    db.executemany("INSERT INTO outbox (broker, topic, payload, qos, retain, rule, received_at) VALUES (?,?,?,?,?,?,?)",
                   poison)
    db.commit()
    db.close()
    probe = probe_factory("out/#", "pipeline/errors/#")
    up = stack_factory(CONFIG.replace("LOCAL", broker.url).replace("PROTOCOL", "5").replace("LIMIT", ""))
    for seq in range(10):
        probe.publish(f"in/d{seq}", {"seq": seq})
    got = probe.wait_for(14, timeout=30)
    outputs = sorted(orjson.loads(p)["seq"] for t, p in got if t.startswith("out/"))
    records = [orjson.loads(p) for t, p in got if t.startswith("pipeline/errors/")]
    assert outputs == list(range(-1, 10))
    assert sorted(r["reason"] for r in records) == ["set_aside"] * 3
    assert {r["error"].split(":")[0] for r in records} == {"the payload is stored as str, not bytes",
                                                          "the topic 'a/+/out' holds a wildcard ('+' or '#')",
                                                          "the topic is empty"}
    time.sleep(1.0)
    doc = egress_of(up)
    assert doc["counters"].get("set_aside") == 3 and doc["outbox"]["set_aside"] == 3 and doc["depth"] == 0
    assert {row["topic"] for row in doc["outbox"]["set_aside_last"]} == {"out/text", "a/+/out", ""}


def test_a_puback_that_refuses_for_now_is_retried(broker, stack_factory, probe_factory):
    fake = FakeBroker(puback_reason=lambda n: 0x97 if n < 3 else 0x00)  # quota exceeded, three times
    text = CONFIG.replace("PROTOCOL", "5").replace("LIMIT", "").replace("LOCAL", broker.url)
    text = text.replace("brokers:\n", f"brokers:\n  odd: {{url: {fake.url}, protocol: \"5\"}}\n")
    text = text.replace('pub: {broker: local', "pub: {broker: odd")
    try:
        up = stack_factory(text)
        egress = stage_pid(up, "egress")
        probe = probe_factory()
        for seq in range(10):
            probe.publish(f"in/d{seq}", {"seq": seq})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and fake.qos1_received < 13:  # 10, and the 3 refused ones again
            time.sleep(0.1)
        time.sleep(1.0)  # the next snapshot
        doc = egress_of(up)
    finally:
        fake.stop()
    published = [orjson.loads(p.payload)["seq"] for c in fake.connections for p in c.published]
    assert sorted(set(published)) == list(range(10)) and len(published) == 13
    assert stage_pid(up, "egress") == egress
    assert doc["counters"].get("refused_transient") == 3 and doc["counters"].get("set_aside") is None
    assert doc["depth"] == 0


def test_a_row_the_broker_closes_the_connection_on_is_set_aside_after_three_strikes(small_broker, stack_factory):
    """MQTT 3.1.1 without max_packet_bytes: nothing tells egress the limit, and Mosquitto closes the connection
    on the packet. Each time that row is the oldest unacknowledged; the third time it is set aside."""
    up = stack_factory(CONFIG.replace("LOCAL", small_broker.url).replace("PROTOCOL", "3.1.1").replace("LIMIT", ""))
    egress = stage_pid(up, "egress")
    probe = Probe(small_broker.port, "out/#", "pipeline/errors/#")
    try:
        probe.publish("in/big", {"seq": 0, "pad": 6000})
        time.sleep(0.5)
        for seq in range(1, 11):
            probe.publish(f"in/d{seq}", {"seq": seq, "pad": 10})
        got = probe.wait_for(11, timeout=60)
    finally:
        probe.close()
    outputs = sorted(orjson.loads(p)["seq"] for t, p in got if t.startswith("out/"))
    records = [orjson.loads(p) for t, p in got if t.startswith("pipeline/errors/")]
    assert outputs == list(range(1, 11))
    assert [(r["reason"], r["topic"]) for r in records] == [("set_aside", "out/big")]
    assert "closed the connection each of the 3 times it was sent" in records[0]["error"]
    assert stage_pid(up, "egress") == egress
    time.sleep(1.0)
    doc = egress_of(up)
    assert doc["outbox"]["set_aside"] == 1 and doc["outbox"]["set_aside_last"][0]["topic"] == "out/big"
    assert doc["depth"] == 0
