"""Shadows and canaries end to end through `pipeline up`, against a real Mosquitto (tests/models/versioned)."""

from __future__ import annotations

import os
import threading
import time

import orjson
import paho.mqtt.client as mqtt

from pipeline.config.schema.behaviour import shadow_topic
from pipeline.stages.worker.stage import SHADOW_NICENESS
from pipeline.trials import key_share

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
    trial = _trial(up, "shadow", lambda t: t["compared"] == t["candidate"]["results"] == n)
    assert trial["compared"] == n and trial["agreed"] == n - differing
    assert trial["agreement_rate"] == (n - differing) / n
    assert trial["live"]["model"] == "live" and trial["candidate"]["model"] == "candidate"
    assert trial["candidate"]["results"] == n and trial["candidate"]["error_rate"] == 0
    assert trial["dropped"] == 0
    pids = {w["rule"]: w["pid"] for m in up.get("/models")[1]["models"] for w in m["workers"]}
    nice = {rule: os.getpriority(os.PRIO_PROCESS, pid) for rule, pid in pids.items()}
    assert nice["scores~shadow"] == min(19, nice["scores"] + SHADOW_NICENESS)  # the live version is scheduled first


def test_a_shadow_of_a_share_of_the_messages_is_compared_on_those_only(broker, probe_factory, stack_factory):
    n = 300
    up = stack_factory(SHADOW.replace("BROKER", broker.url).replace("{model: candidate}",
                                                                    "{model: candidate, percent: 40}"))
    live, shadow = probe_factory("out/#"), probe_factory(f"{shadow_topic('scores')}/#")
    feeder = probe_factory()
    for seq in range(n):
        feeder.publish(f"in/d{seq % 7}/data", {"seq": seq})
    assert len(live.wait_for(n, 20)) == n
    time.sleep(1.0)
    copies = [orjson.loads(p) for _, p in shadow.received()]
    assert 0.25 * n < len(copies) < 0.55 * n
    trial = _trial(up, "shadow", lambda t: t["compared"] == t["candidate"]["results"] == len(copies))
    assert trial["compared"] == len(copies) and trial["unmatched"] == 0 and trial["percent"] == 40
    assert trial["agreed"] == sum(1 for c in copies if c["value"] == 2 * c["seq"])


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


CANARY = """
brokers:
  local: {url: BROKER}
models:
  live: {path: MODELS/versioned, params: {tag: live}}
  candidate: {path: MODELS/versioned, params: {tag: candidate, fail_every: 5}}
rules:
  - name: scores
    sub: {broker: local, topic: "in/+/data", qos: 1}
    model: live
    pub: {broker: local, topic: "out/{1}", qos: 1}
    workers: 2
    canary: {model: candidate, percent: 10, max_error_rate: 1%, window: 5s, then: promote}
control: {listen: CONTROL}
"""
DEVICES = 199  # prime to 5: each device's seqs fail on the candidate one time in five


def _publish(port: int, n: int, rate: float, topic_for) -> threading.Thread:
    """Publish n QoS 1 messages {"seq": seq} evenly paced at `rate` msg/s, from a thread."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    c.max_inflight_messages_set(100)
    c.max_queued_messages_set(0)
    c.connect("127.0.0.1", port)
    c.loop_start()

    def body() -> None:
        t0 = time.monotonic()
        for seq in range(n):
            delay = t0 + seq / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            c.publish(topic_for(seq), orjson.dumps({"seq": seq}), 1)

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.client = c
    return t


def _outcomes(probe) -> dict[int, list[str]]:
    """seq -> the tags of its outputs (the version that answered) and "error" for each of its error records."""
    out: dict[int, list[str]] = {}
    for topic, payload in probe.received():
        body = orjson.loads(payload)
        if topic.startswith("pipeline/errors/"):
            out.setdefault(orjson.loads(body["payload"])["seq"], []).append("error")
        else:
            out.setdefault(body["seq"], []).append(body["tag"])
    return out


def test_a_failing_canary_is_rolled_back_within_its_window_and_nothing_is_lost(broker, probe_factory,
                                                                               stack_factory):
    n, rate, window = 8000, 1000.0, 5.0
    up = stack_factory(CANARY.replace("BROKER", broker.url))
    out = probe_factory("out/#", "pipeline/errors/#")
    t0 = time.time()
    loader = _publish(broker.port, n, rate, lambda seq: f"in/d{seq % DEVICES}/data")
    deadline = time.monotonic() + n / rate + 30
    while len(_outcomes(out)) < n and time.monotonic() < deadline:
        time.sleep(0.5)
    loader.join(1)
    loader.client.loop_stop()
    outcomes = _outcomes(out)
    assert sorted(outcomes) == list(range(n)), f"{n - len(outcomes)} lost"
    twice = {seq: o for seq, o in outcomes.items() if len(o) != 1}
    assert not twice, f"{len(twice)} with more than one output or error record, e.g. {list(twice.items())[:5]}"
    trial = _trial(up, "canary", lambda t: t["state"] != "running")
    assert trial["state"] == "rolled_back" and trial["serving_percent"] == 0 and trial["rollbacks"] == 1
    assert "max_error_rate" in trial["reason"] and trial["decided_at"] - t0 <= window + 5
    candidate_keys = {f"in/d{d}/data" for d in range(DEVICES) if key_share(f"in/d{d}/data") < 10}
    served = {seq for seq, o in outcomes.items() if o[0] in ("candidate", "error")}
    assert served and all(f"in/d{seq % DEVICES}/data" in candidate_keys for seq in served)
    last = max(served)  # after the verdict (and ingress's next look at it) the live version serves every key
    assert last < (trial["decided_at"] - t0 + 1.5) * rate, (last, trial["decided_at"] - t0)
    assert all(o == ["live"] for seq, o in outcomes.items() if seq > last)


SLOW_CANARY = """
brokers:
  local: {url: BROKER}
models:
  live: {path: MODELS/versioned, params: {tag: live}}
  candidate: {path: MODELS/versioned, params: {tag: candidate, sleep: 0.05}}
rules:
  - name: scores
    sub: {broker: local, topic: "in/+/data", qos: 1}
    model: live
    pub: {broker: local, topic: "out/{1}", qos: 1}
    canary: {model: candidate, percent: 30, max_p99: 20ms, window: 10s}
control: {listen: CONTROL}
"""


def test_a_slow_canary_is_rolled_back_and_what_waited_for_it_is_served_by_the_live_version(broker, probe_factory,
                                                                                          stack_factory):
    n, rate = 2000, 400.0
    up = stack_factory(SLOW_CANARY.replace("BROKER", broker.url))
    out = probe_factory("out/#", "pipeline/errors/#")
    loader = _publish(broker.port, n, rate, lambda seq: f"in/d{seq % DEVICES}/data")
    deadline = time.monotonic() + n / rate + 30
    while len(_outcomes(out)) < n and time.monotonic() < deadline:
        time.sleep(0.5)
    loader.join(1)
    loader.client.loop_stop()
    outcomes = _outcomes(out)
    assert sorted(outcomes) == list(range(n)), f"{n - len(outcomes)} lost"
    assert all(len(o) == 1 and o != ["error"] for o in outcomes.values())
    served = sum(o == ["candidate"] for o in outcomes.values())
    trial = _trial(up, "canary", lambda t: t["state"] != "running" and t["candidate"]["results"] == served)
    assert trial["state"] == "rolled_back" and "max_p99" in trial["reason"]
    handed_back = up.get("/stages")[1]["stages"][0]["counters"].get("canary_handed_back.scores", 0)
    assert handed_back > 0  # the candidate's backlog went to the live version
    assert served == trial["candidate"]["results"]  # each answered once: by the candidate, or by the live version


GOOD_CANARY = CANARY.replace("fail_every: 5", "differ_every: 1000000").replace("window: 5s", "window: 2s")


def test_a_canary_that_holds_for_its_window_is_promoted_to_every_key(broker, probe_factory, stack_factory):
    up = stack_factory(GOOD_CANARY.replace("BROKER", broker.url))
    out = probe_factory("out/#")
    feeder = probe_factory()
    for seq in range(300):
        feeder.publish(f"in/d{seq % DEVICES}/data", {"seq": seq})
    trial = _trial(up, "canary", lambda t: t["state"] != "running", timeout=15)
    assert trial["state"] == "promoted" and trial["serving_percent"] == 100
    time.sleep(0.5)
    for seq in range(300, 400):
        feeder.publish(f"in/d{seq % DEVICES}/data", {"seq": seq})
    out.wait_for(400, 10)
    outcomes = _outcomes(out)
    assert sorted(outcomes) == list(range(400))
    assert all(outcomes[seq] == ["candidate"] for seq in range(300, 400))


READ_TRIALS = """JSON.stringify([...document.querySelectorAll('[data-trial]')].map(t => ({
  trial: t.dataset.trial, state: t.dataset.state,
  fields: Object.fromEntries([...t.querySelectorAll('[data-field]')].map(f => [f.dataset.field, f.textContent]))
})))"""


def test_the_dashboard_shows_a_rule_s_two_versions_side_by_side(broker, probe_factory, stack_factory, tmp_path):
    from test_dashboard import Browser, wait_until

    up = stack_factory(SHADOW.replace("BROKER", broker.url))
    feeder = probe_factory()
    for seq in range(40):
        feeder.publish(f"in/d{seq % 7}/data", {"seq": seq})
    browser = Browser(tmp_path / "chromium-profile")
    try:
        browser.call("Page.navigate", url=f"http://{up.control}/")

        def shown() -> dict | None:
            tables = {t["trial"]: t for t in orjson.loads(browser.evaluate(READ_TRIALS))}
            t = tables.get("scores:shadow")
            return t if t and t["fields"]["candidate.results"] == t["fields"]["live.results"] == "40" else None

        table = wait_until(shown, 30, "the shadow's versions on the page")
        boxes = set(browser.boxes())
    finally:
        browser.close()
    f = table["fields"]
    assert (f["live.model"], f["candidate.model"], f["live.results"]) == ("live", "candidate", "40")
    assert f["summary"].startswith("shadow: agreement 75.00 % of 40 compared")  # differ_every: 4
    assert {"rule:scores", "rule:scores~shadow"} <= boxes


KEYED_SHADOW = """
brokers:
  local: {url: BROKER}
models:
  live: {path: MODELS/counting}
  candidate: {path: MODELS/counting}
rules:
  - name: counts
    sub: {broker: local, topic: "in/+/data", qos: 1}
    model: live
    pub: {broker: local, topic: "out/{1}", qos: 1}
    key: device
    workers: 2
    shadow: {model: candidate, workers: 2}
control: {listen: CONTROL}
"""


def test_a_keyed_rule_s_shadow_keeps_states_of_its_own(broker, probe_factory, stack_factory):
    n, devices = 150, 5
    up = stack_factory(KEYED_SHADOW.replace("BROKER", broker.url))
    live, shadow = probe_factory("out/#"), probe_factory(f"{shadow_topic('counts')}/#")
    feeder = probe_factory()
    for seq in range(n):
        feeder.publish(f"in/d{seq % devices}/data", {"device": f"d{seq % devices}", "seq": seq})
    assert len(live.wait_for(n, 20)) == n and len(shadow.wait_for(n, 20)) == n
    trial = _trial(up, "shadow", lambda t: t["compared"] == n)
    assert (trial["compared"], trial["agreed"], trial["dropped"]) == (n, n, 0)  # the same counts, key by key
    for name in ("counts", "counts~shadow"):
        assert up.get(f"/rules/{name}/state/d0")[1]["state"] == {"n": n // devices}
