"""End to end through `pipeline up`, against a real Mosquitto started by the test."""

from __future__ import annotations

import signal
import time

import orjson
from conftest import processes

RULES = """
brokers:
  local: {url: BROKER}
models:
  probe: {path: MODELS/probe, params: {tag: one}}
  probe2: {path: MODELS/probe, params: {tag: two}}
rules:
  - name: first
    sub: {broker: local, topic: "in/+/data", qos: 1}
    model: probe
    pub: {broker: local, topic: "out/{1}/first", qos: 1}
    workers: 2
    timeout: 2s
  - name: second
    sub: {broker: local, topic: "in/+/#", qos: 1}
    model: probe2
    pub: {broker: local, topic: "out/{1}/second", qos: 1}
    errors: {topic: "errs/second"}
control: {listen: CONTROL}
"""


def config(broker) -> str:
    return RULES.replace("BROKER", broker.url)


def test_messages_flow_through_two_rules_with_templating(broker, probe_factory, stack_factory):
    stack_factory(config(broker))
    probe = probe_factory("out/#")
    for seq in range(50):
        probe.publish(f"in/dev{seq % 5}/data", {"seq": seq})
    got = probe.wait_for(100)
    assert len(got) == 100
    by_rule: dict[str, dict[int, dict]] = {"first": {}, "second": {}}
    for topic, payload in got:
        body = orjson.loads(payload)
        _, dev, rule = topic.split("/")
        assert dev == f"dev{body['seq'] % 5}"  # {1} = level 1 of the input topic
        assert body["rule"] == rule and body["tag"] == {"first": "one", "second": "two"}[rule]
        assert body["topic"] == f"in/{dev}/data" and body["message_id"]
        by_rule[rule][body["seq"]] = body
    assert sorted(by_rule["first"]) == sorted(by_rule["second"]) == list(range(50))
    assert len({b["pid"] for b in by_rule["first"].values()}) >= 1


def _ingress_counts(up, n: int) -> dict:
    """The ingress row of /stages once it counted `n` received (snapshots may be 0.5 s behind)."""
    deadline = time.monotonic() + 5
    ing = up.get("/stages")[1]["stages"][0]
    while ing["received"] < n and time.monotonic() < deadline:
        time.sleep(0.2)
        ing = up.get("/stages")[1]["stages"][0]
    time.sleep(0.6)  # and nothing more comes
    return up.get("/stages")[1]["stages"][0]


def test_overlapping_filters_over_mqtt5_feed_each_rule_every_message_once(broker, probe_factory, stack_factory):
    """Over MQTT 5 Mosquitto sends one copy of a message per matching subscription (in/+/data and in/+/#): each
    copy carries the Subscription Identifier of its subscription and feeds that subscription's rule only."""
    up = stack_factory(config(broker).replace("local: {url: " + broker.url + "}",
                                              "local: {url: " + broker.url + ', protocol: "5"}'))
    probe = probe_factory("out/#")
    for seq in range(50):
        probe.publish(f"in/dev{seq % 5}/data", {"seq": seq})
    for seq in range(50, 60):
        probe.publish(f"in/dev{seq % 5}/other", {"seq": seq})  # second's filter only
    got = probe.wait_for(110)
    time.sleep(1)
    seqs: dict[str, list[int]] = {"first": [], "second": []}
    for topic, payload in probe.received():
        seqs[topic.split("/")[2]].append(orjson.loads(payload)["seq"])
    assert sorted(seqs["first"]) == list(range(50)) and sorted(seqs["second"]) == list(range(60)), len(got)
    ing = _ingress_counts(up, 110)
    assert ing["received"] == 110  # a copy per subscription: 50 x 2 + 10
    assert ing["dispatched"] == 110 and ing["unrouted"] == 0
    assert up.get("/rules")[1]["brokers"]["local"]["protocol_in_use"] == {"ingress": "5", "egress": "5"}


def test_a_subscription_left_by_an_earlier_config_feeds_no_rule(broker, probe_factory, stack_factory):
    """ingress's session is persistent and it never unsubscribes: after its filter changed from in/+/data to
    in/+/#, Mosquitto still sends a copy for the old subscription; its id names no subscription of this config."""
    one = config(broker).split("  - name: second")[0] + "control: {listen: CONTROL}\n"
    one = one.replace("local: {url: " + broker.url + "}", "local: {url: " + broker.url + ', protocol: "5"}')
    assert stack_factory(one).stop() == 0
    up = stack_factory(one.replace('"in/+/data"', '"in/+/#"'))
    probe = probe_factory("out/#")
    for seq in range(20):
        probe.publish(f"in/dev{seq % 5}/data", {"seq": seq})
    probe.wait_for(20)
    time.sleep(1)
    assert sorted(orjson.loads(p)["seq"] for _, p in probe.received()) == list(range(20))
    ing = _ingress_counts(up, 40)
    assert ing["received"] == 40 and ing["dispatched"] == 20 and ing["unrouted"] == 20
    assert ing["counters"]["stale_subscription"] == 20


def test_bad_input_goes_to_error_topic_and_next_message_passes(broker, probe_factory, stack_factory):
    stack_factory(config(broker))
    probe = probe_factory("out/+/first", "pipeline/errors/#")
    probe.publish("in/d1/data", {"fail": True, "seq": 1})
    probe.publish("in/d1/data", b"{not json")
    probe.publish("in/d1/data", b"\xff\xfe\x00garbage")
    probe.publish("in/d1/data", {"unserialisable": True})
    probe.publish("in/d1/data", {"exit": True})
    probe.publish("in/d1/data", {"skip": True})
    probe.publish("in/d1/data", {"seq": 99})
    got = probe.wait_for(6)
    time.sleep(0.5)
    errors = [orjson.loads(p) for t, p in probe.received("pipeline/errors/first")]
    reasons = sorted(e["reason"] for e in errors)
    assert reasons == ["bad_payload", "bad_payload", "model_error", "model_error", "unserialisable_result"]
    by_error = {e["error"].split(":")[0]: e for e in errors}
    assert "ValueError" in by_error and "SystemExit" in by_error
    assert by_error["ValueError"]["payload"] == '{"fail":true,"seq":1}'
    garbage = [e for e in errors if e["payload_encoding"] == "base64"]
    assert len(garbage) == 1 and "not UTF-8" in garbage[0]["error"]
    assert all(e["rule"] == "first" and e["topic"] == "in/d1/data" and e["message_id"] for e in errors)
    outputs = [orjson.loads(p) for t, p in got if t == "out/d1/first"]
    assert [o["seq"] for o in outputs] == [99]  # skip published nothing, the good one came through


def test_result_encodings(broker, probe_factory, stack_factory):
    stack_factory(config(broker))
    probe = probe_factory("out/+/first")
    probe.publish("in/d1/data", {"bytes": True})
    probe.publish("in/d1/data", {"nan": True})
    got = dict(probe.wait_for(2))
    assert len(got) == 1 or True  # both go to the same topic; check the list instead
    payloads = sorted(p for _, p in probe.received())
    assert b"\x00raw\xff" in payloads
    assert orjson.loads([p for p in payloads if p.startswith(b"{")][0]) == {
        "nan": None, "inf": None, "text": "température"}
    assert "température".encode() in [p for p in payloads if p.startswith(b"{")][0]


def test_workers_override_starts_that_many_processes_and_sigterm_cleans_up(broker, stack_factory):
    up = stack_factory(config(broker), "--workers", "first=3")
    status, doc = up.get("/stages")
    rule = next(s for s in doc["stages"] if s["name"] == "rule:first")
    assert rule["workers"] == 3
    deadline = time.monotonic() + 5
    while rule["workers_alive"] < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
        rule = next(s for s in up.get("/stages")[1]["stages"] if s["name"] == "rule:first")
    assert rule["workers_alive"] == 3
    pids = up.pids()
    workers = [p for p, cmd in processes().items() if p in pids and "worker --rule first" in cmd]
    assert len(workers) == 3
    assert len(pids) >= 7  # supervisord, ingress, egress, control (2), 3 + 1 workers
    t0 = time.monotonic()
    assert up.stop() == 0
    assert time.monotonic() - t0 < 10
    assert up.pids() == []
    assert not set(pids) & set(processes())


def test_ten_thousand_qos1_messages_two_workers(broker, probe_factory, stack_factory):
    one_rule = config(broker).split("  - name: second")[0] + "control: {listen: CONTROL}\n"
    up = stack_factory(one_rule, "--workers", "first=2")
    probe = probe_factory("out/#")
    n = 10_000
    for seq in range(n):
        probe.publish(f"in/d{seq % 100}/data", {"seq": seq, "value": seq * 0.5})
    got = probe.wait_for(n, timeout=60)
    seqs = sorted(orjson.loads(p)["seq"] for _, p in got)
    assert seqs == list(range(n)), f"{len(seqs)} results, {n - len(set(seqs))} missing"
    for topic, payload in got[:500]:
        body = orjson.loads(payload)
        assert topic == f"out/d{body['seq'] % 100}/first" and body["tag"] == "one"
    doc = up.get("/stages")[1]
    time.sleep(1)
    doc = up.get("/stages")[1]
    ing, rule, egr = doc["stages"]
    assert ing["received"] == n and rule["processed"] == n and egr["published"] == n
    assert len({orjson.loads(p)["pid"] for _, p in got}) == 2  # both workers took a share


def test_model_that_cannot_import_is_fatal_with_reason(broker, stack_factory):
    bad = config(broker).replace("MODELS/probe, params: {tag: one}", "MODELS/broken")
    up = stack_factory(bad, ready=False)
    rc = up.proc.wait(30)
    out = up.output()
    assert rc == 3, out
    assert "MODEL_LOAD_ERROR" in out and "this_module_does_not_exist" in out
    assert up.pids() == []


def test_sigint_stops_like_ctrl_c(broker, stack_factory):
    up = stack_factory(config(broker))
    pids = up.pids()
    up.proc.send_signal(signal.SIGINT)
    assert up.proc.wait(12) == 0
    assert up.pids() == [] and pids
