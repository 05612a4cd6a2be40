"""An MQTT 5 broker that refuses a result (PUBACK reason >= 0x80, here Mosquitto's ACL: 0x87 not authorized).

Egress must not count it as published: it counts it as `refused`, logs it once per reason, sets the row
aside with an error record on the rule's error topic (a retry would meet the same answer), and the results
the broker accepts keep flowing.
"""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import pytest
from conftest import Mosquitto, Probe

CONFIG = """
brokers:
  local: {url: BROKER, protocol: "5"}
models:
  probe: {path: MODELS/probe}
rules:
  - name: acl
    sub: {broker: local, topic: "in/+", qos: 1}
    model: probe
    pub: {broker: local, topic: "{1}/out", qos: 1}
control: {listen: CONTROL}
"""


@pytest.fixture
def acl_broker(tmp_path: Path):
    (tmp_path / "acl").write_text("topic readwrite in/#\ntopic readwrite ok/#\ntopic readwrite pipeline/#\n"
                                  "topic read denied/#\n")
    (tmp_path / "mosquitto").mkdir()
    m = Mosquitto(tmp_path / "mosquitto", extra=(f"acl_file {tmp_path / 'acl'}",))
    m.start()
    yield m
    m.stop()


def test_a_result_the_broker_refuses_is_counted_as_refused_not_published(acl_broker, stack_factory):
    up = stack_factory(CONFIG.replace("BROKER", acl_broker.url))
    probe = Probe(acl_broker.port, "ok/out", "denied/out", "pipeline/errors/#")
    try:
        for seq in range(10):
            probe.publish("in/ok" if seq % 2 else "in/denied", {"seq": seq})
        got = probe.wait_for(10, timeout=15)
        assert sorted(t for t, _ in got) == ["ok/out"] * 5 + ["pipeline/errors/acl"] * 5
        records = [orjson.loads(p) for t, p in got if t.startswith("pipeline/")]
        assert {(r["reason"], r["topic"], r["error"]) for r in records} == {
            ("set_aside", "denied/out", "broker local refused it (PUBACK 0x87)")}
        deadline = time.monotonic() + 15
        egress = {}
        while time.monotonic() < deadline:
            egress = next(s for s in up.get("/stages")[1]["stages"] if s["name"] == "egress")
            if egress["counters"].get("set_aside") == 5 and egress["depth"] == 0:
                break
            time.sleep(0.2)
        assert egress["counters"].get("refused") == 5 and egress["outbox"]["set_aside"] == 5, egress
        assert egress["depth"] == 0  # the refused rows left the outbox: they do not block it
        assert up.output().count("refused a result (PUBACK 0x87 Not authorized") == 1
        assert probe.received("denied/") == []
    finally:
        probe.close()
