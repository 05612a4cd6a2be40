"""Keyed rules through `pipeline up` (real Mosquitto, real processes): per-key order and `context.state`."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import orjson

from pipeline.keyed import store

COUNTING = """
def handler(event, context):
    context.state["n"] = context.state.get("n", 0) + 1
    return {"device": event["device"], "seq": event["seq"], "count": context.state["n"], "key": context.key}
"""

CONFIG = """
brokers:
  local: {url: BROKER}
models:
  counting: {path: FOLDER}
rules:
  - name: counting
    sub: {broker: local, topic: "kc/+/in", qos: 1}
    model: counting
    pub: {broker: local, topic: "kc/{1}/out", qos: 1}
    workers: 3
    key: KEY
control: {listen: CONTROL}
"""


def _stack(stack_factory, broker, tmp_path: Path, key: str = '"{1}"'):
    folder = tmp_path / "counting"
    folder.mkdir()
    (folder / "index.py").write_text(COUNTING)
    return stack_factory(CONFIG.replace("BROKER", broker.url).replace("FOLDER", str(folder)).replace("KEY", key))


def test_counts_per_key_come_out_in_order_and_the_state_is_stored(broker, probe_factory, stack_factory, tmp_path):
    _stack(stack_factory, broker, tmp_path)
    probe = probe_factory("kc/+/out", "pipeline/errors/#")
    per_device = 60
    for seq in range(per_device):
        for d in range(10):
            probe.publish(f"kc/d{d}/in", {"device": d, "seq": seq})
    got = probe.wait_for(10 * per_device, timeout=30)
    by_device: dict[int, list[tuple[int, int]]] = {}
    for topic, payload in got:
        body = orjson.loads(payload)
        assert topic == f"kc/d{body['device']}/out" and body["key"] == f"d{body['device']}"
        by_device.setdefault(body["device"], []).append((body["seq"], body["count"]))
    for d, seen in by_device.items():
        assert seen == [(s, s + 1) for s in range(per_device)], f"device {d}: {seen[:10]}"
    db = sqlite3.connect(tmp_path / "data" / store.OUTBOX_FILE)
    stored = store.read(db, "counting", "d3")
    assert stored is not None and store.decode(stored.value) == {"n": per_device}
    assert time.time() - stored.updated_at < 60


def test_a_message_without_a_key_value_is_an_error_record(broker, probe_factory, stack_factory, tmp_path):
    _stack(stack_factory, broker, tmp_path, key="id")
    probe = probe_factory("kc/+/out", "pipeline/errors/#")
    probe.publish("kc/a/in", {"device": 1, "seq": 0})
    probe.publish("kc/a/in", {"device": 1, "seq": 1, "id": "x"})
    probe.publish("kc/a/in", b"not json")
    got = probe.wait_for(3, timeout=15)
    errors = {orjson.loads(p)["reason"]: orjson.loads(p)["error"] for t, p in got if t.startswith("pipeline/errors/")}
    assert errors.keys() == {"no_key", "bad_payload"}, errors
    assert "key part id has no value" in errors["no_key"] and "not JSON" in errors["bad_payload"], errors
    outputs = [orjson.loads(p) for t, p in got if t == "kc/a/out"]
    assert outputs == [{"device": 1, "seq": 1, "count": 1, "key": "x"}]
