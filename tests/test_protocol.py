"""`protocol: auto` (the default) on real brokers: Mosquitto speaks MQTT 5 and gets it; the embedded broker (amqtt)
is spoken to in 3.1.1 without trying 5; amqtt run as a plain `mqtt://` broker never answers an MQTT 5 CONNECT, so
the links step down to 3.1.1 after the CONNACK timeout. /rules shows the version each stage's link chose, and a
message flows through each stack."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import paho.mqtt.client as mqtt
import pytest
from conftest import Mosquitto, free_port, wait_port

CONFIG = """
brokers:
  local: {url: URL}
models:
  probe: {path: MODELS/probe}
rules:
  - name: echo
    sub: {broker: local, topic: "in/+", qos: 1}
    model: probe
    pub: {broker: local, topic: "out/{1}", qos: 1}
control: {listen: CONTROL}
"""


def _in_use(up) -> dict:
    broker = up.get("/rules")[1]["brokers"]["local"]
    assert broker["protocol"] == "auto"
    deadline = time.monotonic() + 5  # ready means connected; the snapshot with the version may be 0.5 s behind
    while len(broker["protocol_in_use"]) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
        broker = up.get("/rules")[1]["brokers"]["local"]
    return broker["protocol_in_use"]


def _flows(port: int, protocol: int) -> None:
    """One message in, its result out, through a client of `protocol` (amqtt takes only 3.1.1)."""
    got: list[tuple[str, bytes]] = []
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=protocol)
    c.on_message = lambda _c, _u, m: got.append((m.topic, m.payload))
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        c.subscribe("out/+", 1)
        time.sleep(0.5)
        c.publish("in/a", orjson.dumps({"seq": 7}), 1)
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [(t, orjson.loads(p)["seq"]) for t, p in got] == [("out/a", 7)]
    finally:
        c.loop_stop()
        c.disconnect()


@pytest.fixture
def chatty_broker(tmp_path: Path):
    """A Mosquitto that logs each client's protocol level and clean flag ("(p5, c0, k30)")."""
    (tmp_path / "mosquitto").mkdir()
    m = Mosquitto(tmp_path / "mosquitto", extra=("log_type notice",))
    m.start()
    yield m
    m.stop()


def test_auto_speaks_mqtt5_to_mosquitto(chatty_broker, stack_factory):
    up = stack_factory(CONFIG.replace("URL", chatty_broker.url))
    assert _in_use(up) == {"ingress": "5", "egress": "5"}
    log = (chatty_broker.workdir / "mosquitto.log").read_text()
    # ingress keeps its session (clean start 0, with a session expiry), egress starts afresh: as in 3.1.1
    assert re.search(r"as \S+-ingress-local \(p5, c0,", log), log
    assert re.search(r"as \S+-egress-local \(p5, c1,", log), log
    assert "MQTT 5 chosen (protocol: auto)" in up.output() and "trying MQTT 3.1.1" not in up.output()
    _flows(chatty_broker.port, mqtt.MQTTv5)


def test_auto_speaks_311_to_the_embedded_broker_without_trying_5(stack_factory):
    port = free_port()
    up = stack_factory(CONFIG.replace("URL", f"embedded://127.0.0.1:{port}"))
    wait_port(port)
    assert _in_use(up) == {"ingress": "3.1.1", "egress": "3.1.1"}
    assert "MQTT 5 connect failed" not in up.output()
    _flows(port, mqtt.MQTTv311)


@pytest.fixture
def amqtt_broker(tmp_path: Path):
    """amqtt (what `pipeline broker` runs) as a broker of its own: it speaks MQTT 3.1.1 only."""
    port = free_port()
    log = (tmp_path / "amqtt.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "broker", "--listen", f"127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_port(port)
    yield port
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(10)


def test_auto_steps_down_to_311_on_a_broker_that_never_answers_mqtt5(amqtt_broker, stack_factory):
    t0 = time.monotonic()
    up = stack_factory(CONFIG.replace("URL", f"mqtt://127.0.0.1:{amqtt_broker}"))
    took = time.monotonic() - t0
    assert _in_use(up) == {"ingress": "3.1.1", "egress": "3.1.1"}
    out = up.output()
    for stage in ("ingress", "egress"):
        assert re.search(rf"{stage}.*broker local: MQTT 5 connect failed \(no CONNACK within 5 s\); trying MQTT "
                         r"3\.1\.1", out), out
    assert out.count("broker local: MQTT 3.1.1 chosen (protocol: auto)") == 2, out
    assert "cannot reach broker" not in out  # the step down is expected: no warning
    assert took < 15, f"ready after {took:.1f} s"
    _flows(amqtt_broker, mqtt.MQTTv311)
