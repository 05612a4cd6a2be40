"""handler_batch(events, context): a frame's events in one model call (tests/models/batch vectorises with
numpy). Units on the worker's Processor with the real model loaded; then a real stack, where a call that
hangs on one event of many costs that event only."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest

from pipeline.config import load as config
from pipeline.models import loader as model
from pipeline.stages.worker.process import Processor
from pipeline.wire import frames as envelope
from pipeline.wire.frames import Message

MODELS = Path(__file__).parent / "models"


@pytest.fixture
def proc(tmp_path: Path) -> Processor:
    path = tmp_path / "stack.yaml"
    path.write_text(f"""
brokers: {{local: {{url: "mqtt://127.0.0.1:1883"}}}}
models: {{b: {{path: {MODELS}/batch}}}}
rules: [{{name: r, sub: {{broker: local, topic: "in/+", qos: 1}}, model: b, pub: {{broker: local, topic: "out/{{1}}"}},
         filter: {{all: [{{path: [seq], op: "!=", value: 99}}]}}}}]
""")
    rule = config.load(path).rules[0]
    loaded = model.load("b_" + str(id(tmp_path)), MODELS / "batch")
    return Processor(rule, loaded, model.Context("r", "b", {}, logging.getLogger("b")))


def msg(seq: int, event: dict | bytes, attempt: int = 1, qos: int = 1) -> Message:
    payload = event if isinstance(event, bytes) else orjson.dumps({"seq": seq, **event})
    return Message(f"m-{seq}", "r", "local", f"in/d{seq}", payload, qos, seq, attempt, 1700000000.0 + seq)


def out(results: list[envelope.Result]) -> list[dict]:
    return [orjson.loads(r.payload) if r.kind == envelope.PUBLISH else {"kind": r.kind} for r in results]


def test_a_frame_is_one_call_and_each_result_keeps_its_own_message(proc):
    results = proc.run_batch([msg(i, {"value": i}) for i in range(5)])
    got = out(results)
    assert [g["seq"] for g in got] == list(range(5)) and [g["value"] for g in got] == [0.0, 2.0, 4.0, 6.0, 8.0]
    assert {g["batch"] for g in got} == {5}  # one call for the frame
    assert [(g["topic"], g["message_id"]) for g in got] == [(f"in/d{i}", f"m-{i}") for i in range(5)]
    assert {g["alone_topic"] for g in got} == {None}  # context.topic is not one message's in a batch call
    assert [r.topic for r in results] == [f"out/d{i}" for i in range(5)]


def test_bad_payloads_filtered_events_and_retries_stay_out_of_the_call(proc):
    frame = [msg(0, {}), msg(1, b"not json"), msg(99, {}), msg(3, {}, attempt=2), msg(4, {})]  # the filter refuses 99
    results = proc.run_batch(frame)
    kinds = [r.kind for r in results]
    assert kinds == [envelope.PUBLISH, envelope.ERROR, envelope.NOTHING, envelope.PUBLISH, envelope.PUBLISH]
    assert orjson.loads(results[1].payload)["reason"] == "bad_payload"
    got = out(results)
    assert (got[0]["batch"], got[4]["batch"]) == (2, 2)  # 0 and 4 together
    assert (got[3]["batch"], got[3]["attempt"], got[3]["alone_topic"]) == (1, 2, "in/d3")  # a retry goes alone


def test_a_failing_call_gives_each_of_its_messages_an_error_record(proc):
    results = proc.run_batch([msg(0, {}), msg(1, {"fail": True}), msg(2, {}), msg(3, {}, attempt=2)])
    records = [orjson.loads(r.payload) for r in results[:3]]
    assert [r.kind for r in results] == [envelope.ERROR] * 3 + [envelope.PUBLISH]
    assert {(r["reason"], r["error"]) for r in records} == {
        ("model_error", "ValueError: asked to fail in a batch of 3")}
    assert [r["message_id"] for r in records] == ["m-0", "m-1", "m-2"]


def test_a_result_list_of_the_wrong_length_is_an_error(proc):
    results = proc.run_batch([msg(0, {}), msg(1, {"short": True}), msg(2, {})])
    errors = {orjson.loads(r.payload)["error"] for r in results}
    assert errors == {"ValueError: handler_batch returned 1 results for 3 event(s): expected a list of 3"}


def test_a_model_with_only_handler_batch_serves_a_single_message(proc):
    (got,) = out(proc.run_batch([msg(7, {"value": 1.5})]))
    assert (got["value"], got["batch"], got["topic"], got["message_id"]) == (3.0, 1, "in/d7", "m-7")
    assert got["alone_topic"] == "in/d7"


def abandon_during_the_call(proc: Processor, frame: list[Message]) -> tuple[Message | None, list[dict]]:
    """Run the frame while a thread plays the watchdog: at the first model call, what would it send?"""
    seen: dict = {}

    def watchdog() -> None:
        while not proc.call_started:
            time.sleep(0.005)
        seen["culprit"], seen["abandon"] = proc.culprit, proc.abandon("timeout after 0.1s")

    t = threading.Thread(target=watchdog)
    t.start()
    proc.run_batch(frame)
    t.join(5)
    return seen["culprit"], [orjson.loads(r.payload) for r in seen["abandon"]]


def test_a_timeout_in_a_call_of_several_blames_none_of_them(proc):
    """No culprit; QoS 0 messages of the call answered with `timeout`, those after it with `not_processed`."""
    frame = [msg(0, {}, qos=0), msg(1, {"sleep": 0.3}, qos=0), msg(2, {}, qos=1), msg(3, {}, attempt=2, qos=0)]
    culprit, records = abandon_during_the_call(proc, frame)
    assert culprit is None
    assert [(r["message_id"], r["reason"]) for r in records] == [("m-0", "timeout"), ("m-1", "timeout"),
                                                                 ("m-3", "not_processed")]
    assert records[0]["error"] == "timeout after 0.1s (a handler_batch call of 3 messages)"
    assert records[2]["error"] == "worker restarted after timeout after 0.1s on a handler_batch call of 3 messages"


def test_a_timeout_in_a_call_of_one_names_its_message(proc):
    plain = Processor(proc.rule, model.load("probe_" + str(id(proc)), MODELS / "probe"), proc.context)
    frame = [msg(0, {"sleep": 0.3}, qos=0), msg(1, {}, qos=0), msg(2, {}, qos=1)]
    culprit, records = abandon_during_the_call(plain, frame)
    assert culprit is frame[0]
    assert [(r["message_id"], r["reason"], r["error"]) for r in records] == [
        ("m-0", "timeout", "timeout after 0.1s"),
        ("m-1", "not_processed", "worker restarted after timeout after 0.1s on message m-0")]


CONFIG = """
brokers:
  local: {url: BROKER}
models:
  batch: {path: MODELS/batch}
rules:
  - name: vec
    sub: {broker: local, topic: "vec/in", qos: 1}
    model: batch
    pub: {broker: local, topic: "vec/out", qos: 1}
    workers: 1
    timeout: 1s
control: {listen: CONTROL}
"""


def test_a_call_that_hangs_on_one_event_of_many_costs_that_event_only(broker, probe_factory, stack_factory):
    """The worker dies on a timeout in a call of several: ingress sends each message of it again alone (one
    attempt more), so the others come out and the hanging one becomes a dead letter after max_attempts."""
    up = stack_factory(CONFIG.replace("BROKER", broker.url))
    probe = probe_factory("vec/out", "pipeline/errors/#")
    probe.publish("vec/in", {"seq": 0, "sleep": 0.3})  # the worker is busy: the next ones wait in its socket
    time.sleep(0.05)
    for seq in range(1, 12):
        probe.publish("vec/in", {"seq": seq, **({"sleep": 30} if seq == 6 else {})})
    got = probe.wait_for(12, timeout=60)
    results = [orjson.loads(p) for t, p in got if t == "vec/out"]
    letters = [orjson.loads(p) for t, p in got if t != "vec/out"]
    assert Counter(r["seq"] for r in results) == Counter(x for x in range(12) if x != 6), up.output()[-3000:]
    assert [(orjson.loads(lt["payload"])["seq"], lt["reason"]) for lt in letters] == [(6, "timeout")]
    assert "model call of rule vec passed 1s on a handler_batch call of" in up.output()  # the frame was one call
    assert max(r["batch"] for r in results) == 1  # every one came out alone, on its second attempt
