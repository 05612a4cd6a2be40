"""Shared workers on the real stack (real Mosquitto, real supervisord): rules with `workers: shared` are served by
their model's pool. One pool process serves five rules, each with its own context and exact counters in /stages; a
rule's timeout or a kill -9 replaces that process alone and every rule's QoS 1 messages still get their results.
Config errors name the key and the value."""

from __future__ import annotations

import os
import signal
import time

import orjson
import pytest
from conftest import Up, wait_until

from pipeline import errors
from pipeline.config import load

RULES = 5
RULE = """
  - name: s{i}
    sub: {{broker: local, topic: "pool/s{i}/in", qos: 1}}
    model: probe
    pub: {{broker: local, topic: "pool/s{i}/out", qos: 1}}
    workers: shared
    timeout: {timeout}
    max_attempts: {attempts}
"""


def config(broker, rules: int = RULES, timeout: float = 10, pool: int = 1, attempts: int = 3) -> str:
    return (f"brokers:\n  local: {{url: {broker.url}}}\nmodels:\n  probe: {{path: MODELS/probe, pool: {pool}}}\n"
            "rules:" + "".join(RULE.format(i=i, timeout=timeout, attempts=attempts) for i in range(rules))
            + "control: {listen: CONTROL}\n")


def one_pool_process(up: Up) -> int:
    """The single pid serving every rule, once each rule reports it alone."""
    pids = wait_until(lambda: (p := up.worker_pids()) and len(p) == RULES
                      and len(set().union(*p.values())) == 1 and p, 30)
    assert pids, up.worker_pids()
    return next(iter(next(iter(pids.values()))))


def rules_of(up: Up) -> dict[str, dict]:
    return {s["name"].removeprefix("rule:"): s for s in up.get("/stages")[1]["stages"] if s["name"].startswith("rule:")}


def test_one_pool_process_serves_five_rules_each_with_its_own_context_and_counters(broker, probe_factory,
                                                                                   stack_factory):
    up = stack_factory(config(broker))
    pid = one_pool_process(up)
    probe = probe_factory("pool/+/out")
    for i in range(RULES):
        for seq in range(i + 1):  # rule s<i> gets i + 1 messages
            probe.publish(f"pool/s{i}/in", {"seq": seq})
    got = [(topic, orjson.loads(payload)) for topic, payload in probe.wait_for(15, timeout=20)]
    for topic, body in got:
        assert body["rule"] == topic.split("/")[1] and body["pid"] == pid
    assert wait_until(lambda: all(rules_of(up)[f"s{i}"]["processed"] == i + 1 for i in range(RULES)), 5), rules_of(up)
    stages = rules_of(up)
    assert all(stages[f"s{i}"]["received"] == i + 1 and stages[f"s{i}"]["depth"] == 0 for i in range(RULES)), stages
    assert all(stages[f"s{i}"]["workers_alive"] == 1 for i in range(RULES))
    assert up.get("/models")[1]["models"][0]["workers_loaded"] == 1  # one process, whatever the rules it serves


def test_a_timeout_or_kill_replaces_the_pool_process_and_no_rule_loses_a_message(broker, probe_factory,
                                                                                  stack_factory):
    up = stack_factory(config(broker, timeout=1, attempts=1))  # a message sent again with an attempt more: dead
    first = one_pool_process(up)
    probe = probe_factory("pool/+/out", "pipeline/errors/#")
    probe.publish("pool/s0/in", {"seq": 0, "sleep": 30})  # passes s0's timeout: the pool process exits
    time.sleep(0.3)
    for i in range(1, RULES):  # waiting in the pool process, behind s0's call
        probe.publish(f"pool/s{i}/in", {"seq": i})
    got = {topic: orjson.loads(payload) for topic, payload in probe.wait_for(RULES, timeout=20)}
    assert sorted(got) == ["pipeline/errors/s0"] + [f"pool/s{i}/out" for i in range(1, RULES)], got
    assert got["pipeline/errors/s0"]["reason"] == "timeout", got
    assert "exit status 5 (WORKER_TIMEOUT)" in up.output()
    dead = lambda: [rules_of(up)[f"s{i}"]["dead_letters"] for i in range(RULES)]  # noqa: E731
    assert wait_until(lambda: dead() == [1, 0, 0, 0, 0], 5), dead()
    second = wait_until(lambda: (p := one_pool_process(up)) != first and p, 20)  # the dead one's reports age out
    assert second and all(b["pid"] == second for t, b in got.items() if t.startswith("pool/")), (first, second, got)
    os.kill(second, signal.SIGKILL)
    third = wait_until(lambda: (p := one_pool_process(up)) != second and p, 20)
    assert third, up.worker_pids()
    for i in range(RULES):
        probe.publish(f"pool/s{i}/in", {"seq": 100 + i})
    later = [orjson.loads(p) for t, p in probe.wait_for(2 * RULES, timeout=20) if t.startswith("pool/")]
    later = [b for b in later if b["seq"] >= 100]
    assert sorted(b["rule"] for b in later) == [f"s{i}" for i in range(RULES)]
    assert all(b["pid"] == third for b in later)


@pytest.mark.parametrize(("rule_extra", "model_extra", "at", "value"), [
    ("key: '{1}'", "", "key", "{1}"),
    ("max_rss: 100MB", "", "max_rss", "100000000"),
    ("shadow: {model: other}", "", "shadow", "other"),
    ("", "pool: 0", "models.probe.pool", "0"),
    ("", "", "workers", "sharde"),
])
def test_what_a_shared_rule_cannot_do_is_refused_naming_the_key(tmp_path, rule_extra, model_extra, at, value):
    models = tmp_path / "m"
    models.mkdir()
    path = tmp_path / "pipeline.yaml"
    path.write_text(f"""brokers:\n  local: {{url: mqtt://127.0.0.1:1883}}
models:\n  probe: {{path: {models}, {model_extra}}}\n  other: {{path: {models}}}
rules:\n  - {{name: a, sub: {{broker: local, topic: "a/+"}}, model: probe, pub: {{broker: local, topic: out}},
       workers: {"sharde" if at == "workers" else "shared"}, {rule_extra}}}\n""")
    with pytest.raises(errors.ConfigError) as e:
        load.load(path)
    text = str(e.value)
    assert str(path) in text and at in text and value in text, text


RELOAD = """
brokers:
  local: {url: BROKER}
models:
  versioned: {path: MODEL, pool: 2}
rules:
  - {name: a, sub: {broker: local, topic: "rp/a/in", qos: 1}, model: versioned,
     pub: {broker: local, topic: "rp/a/out", qos: 1}, workers: shared}
  - {name: b, sub: {broker: local, topic: "rp/b/in", qos: 1}, model: versioned,
     pub: {broker: local, topic: "rp/b/out", qos: 1}, workers: shared}
  - {name: own, sub: {broker: local, topic: "rp/own/in", qos: 1}, model: versioned,
     pub: {broker: local, topic: "rp/own/out", qos: 1}}
control: {listen: CONTROL, token: TOKEN}
"""


def test_a_hot_reload_replaces_the_pool_processes_and_loses_nothing(broker, probe_factory, stack_factory, tmp_path):
    from test_reload import TOKEN, post, write_model

    write_model(tmp_path / "model", "v1")
    up = stack_factory(RELOAD.replace("BROKER", broker.url).replace("MODEL", str(tmp_path / "model"))
                       .replace("TOKEN", TOKEN))
    before = wait_until(lambda: (p := up.worker_pids()) and len(p["a"]) == 2 and p, 30)
    assert before and before["a"] == before["b"] and not before["a"] & before["own"], before
    probe = probe_factory("rp/+/out")
    for seq in range(30):
        probe.publish("rp/a/in" if seq % 2 else "rp/b/in", {"seq": seq})
    write_model(tmp_path / "model", "v2")
    status, result = post(up, "/models/versioned/reload")
    assert status == 200 and result["ok"], result
    assert result["workers_replaced"] == 3 and result["rules"] == ["own", "versioned~pool"], result
    for seq in range(30, 40):
        probe.publish(f"rp/{'ab'[seq % 2]}/in", {"seq": seq})
    got = {}
    assert wait_until(lambda: got.update({orjson.loads(p)["seq"]: orjson.loads(p)["version"]
                                          for _, p in probe.received("rp/")}) or len(got) == 40, 20), sorted(got)
    assert all(got[seq] == "v2" for seq in range(30, 40)), got
    after = wait_until(lambda: (p := up.worker_pids()) and not p["a"] & before["a"] and len(p["a"]) == 2 and p, 10)
    assert after and after["a"] == after["b"], (before, up.worker_pids())
