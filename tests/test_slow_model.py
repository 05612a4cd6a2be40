"""A slow model (0.4 s per call, 12 s of queued work on one worker) against the in-flight grace period (7 s):
every message must come out once, none again, none as a dead letter."""

from __future__ import annotations

from collections import Counter

import orjson

CONFIG = """
brokers:
  local: {url: BROKER}
models:
  probe: {path: MODELS/probe}
rules:
  - name: slow
    sub: {broker: local, topic: "slow/in", qos: 1}
    model: probe
    pub: {broker: local, topic: "slow/out", qos: 1}
    workers: 1
    timeout: 2s
control: {listen: CONTROL}
"""


def test_messages_queued_at_a_slow_worker_are_not_sent_again(broker, probe_factory, stack_factory):
    up = stack_factory(CONFIG.replace("BROKER", broker.url))
    probe = probe_factory("slow/out", "pipeline/errors/#")
    for seq in range(30):
        probe.publish("slow/in", {"seq": seq, "sleep": 0.4})
    got = probe.wait_for(30, timeout=30)
    assert Counter(orjson.loads(p)["seq"] for t, p in got if t == "slow/out") == Counter(range(30))
    assert [t for t, _ in got if t != "slow/out"] == []  # no dead letter
    probe.wait_for(31, timeout=2)  # a late duplicate would arrive now
    assert len(probe.received()) == 30
    counters = up.get("/stages")[1]["stages"][0]["counters"]
    assert counters.get("redispatched.slow", 0) == 0 and counters.get("dead_letters.slow", 0) == 0
