"""Shadows and canaries end to end through `pipeline up`, against a real Mosquitto (tests/models/versioned)."""

from __future__ import annotations

import time

import orjson

from pipeline.config.schema.behaviour import shadow_topic

SHADOW = """
brokers:
  local: {url: BROKER}
models:
  live: {path: MODELS/versioned}
  candidate: {path: MODELS/versioned, params: {differ_every: 4}}
rules:
  - name: scores
    sub: {broker: local, topic: "in/+/data", qos: 1}
    model: live
    pub: {broker: local, topic: "out/{1}", qos: 1}
    shadow: {model: candidate}
control: {listen: CONTROL}
"""


def _trial(up, kind: str, until, timeout: float = 10.0) -> dict:
    """The /models trial of `kind` once `until(trial)` holds (snapshots are up to 0.5 s behind)."""
    deadline = time.monotonic() + timeout
    while True:
        trial = next(t for t in up.get("/models")[1]["trials"] if t["kind"] == kind)
        if until(trial) or time.monotonic() > deadline:
            return trial
        time.sleep(0.2)


def test_a_shadow_never_reaches_the_live_topic_and_its_agreement_is_measured(broker, probe_factory, stack_factory):
    n = 200
    up = stack_factory(SHADOW.replace("BROKER", broker.url))
    live, shadow = probe_factory("out/#"), probe_factory(f"{shadow_topic('scores')}/#")
    feeder = probe_factory()
    for seq in range(n):
        feeder.publish(f"in/d{seq % 7}/data", {"seq": seq})
    assert len(live.wait_for(n, 20)) == n
    assert len(shadow.wait_for(n, 20)) == n
    time.sleep(0.5)
    outputs = {orjson.loads(p)["seq"]: orjson.loads(p)["value"] for _, p in live.received()}
    assert outputs == {seq: 2 * seq for seq in range(n)}  # the candidate's outputs (value 2 * seq + 1) never here
    assert len(live.received()) == n and len(shadow.received()) == n
    assert all(t == shadow_topic("scores") for t, _ in shadow.received())
    differing = sum(1 for seq in range(n) if seq % 4 == 0)
    trial = _trial(up, "shadow", lambda t: t["compared"] == n)
    assert trial["compared"] == n and trial["agreed"] == n - differing
    assert trial["agreement_rate"] == (n - differing) / n
    assert trial["live"]["model"] == "live" and trial["candidate"]["model"] == "candidate"
    assert trial["candidate"]["results"] == n and trial["candidate"]["error_rate"] == 0
    assert trial["dropped"] == 0


SLOW_SHADOW = """
brokers:
  local: {url: BROKER}
models:
  live: {path: MODELS/versioned}
  candidate: {path: MODELS/versioned, params: {sleep: 0.05, fail_every: 3}}
rules:
  - name: scores
    sub: {broker: local, topic: "in/+/data", qos: 1}
    model: live
    pub: {broker: local, topic: "out/{1}", qos: 1}
    backlog: 10
    shadow: {model: candidate}
control: {listen: CONTROL}
"""


def test_a_slow_failing_shadow_drops_its_own_copies_and_never_holds_the_live_rule(broker, probe_factory,
                                                                                   stack_factory):
    n = 500
    up = stack_factory(SLOW_SHADOW.replace("BROKER", broker.url))
    live, shadow = probe_factory("out/#", "pipeline/errors/#"), probe_factory(f"{shadow_topic('scores')}/#")
    feeder, t0 = probe_factory(), time.monotonic()
    for seq in range(n):
        feeder.publish(f"in/d{seq % 7}/data", {"seq": seq})
    assert len(live.wait_for(n, 20)) == n
    took = time.monotonic() - t0
    assert took < n * 0.05 / 2, f"the live rule took {took:.1f}s: it waited for its shadow"
    assert not live.received("pipeline/errors/")  # the candidate's failures are its own
    trial = _trial(up, "shadow", lambda t: t["dropped"] + t["candidate"]["results"] == n, timeout=30)
    assert trial["dropped"] > 0 and trial["dropped"] + trial["candidate"]["results"] == n
    got = shadow.wait_for(trial["candidate"]["results"], 5)
    errors = [t for t, _ in got if t.endswith("/errors")]
    assert len(got) == trial["candidate"]["results"] and len(errors) == trial["candidate"]["errors"] > 0
