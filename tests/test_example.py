"""The README's first command: conf/example.yaml with the embedded (amqtt) broker, as a new user runs it; and the
example models the README shows, called as a worker calls them."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

import orjson
import paho.mqtt.client as mqtt
import pytest
from conftest import ROOT, Up, free_port, wait_port

from pipeline.models import loader


def _env(tmp_path, broker_url: str) -> dict[str, str]:
    return {**os.environ, "PIPELINE_BROKER_URL": broker_url, "PIPELINE_DATA_DIR": str(tmp_path / "data"),
            "PIPELINE_CONTROL_LISTEN": f"127.0.0.1:{free_port()}"}


def test_example_stack_on_embedded_broker_answers_within_a_second(tmp_path, monkeypatch):
    port = free_port()
    env = _env(tmp_path, f"embedded://127.0.0.1:{port}")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    up = Up(ROOT / "conf" / "example.yaml", tmp_path / "run", env["PIPELINE_CONTROL_LISTEN"])
    try:
        up.wait_ready()
        wait_port(port)
        got: list[tuple[str, bytes, float]] = []
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        c.on_message = lambda _c, _u, m: got.append((m.topic, m.payload, time.monotonic()))
        c.connect("127.0.0.1", port)
        c.subscribe([("plant/+/alarm", 1), ("plant/+/calibrated", 1)])
        c.loop_start()
        time.sleep(0.5)
        t0 = time.monotonic()
        c.publish("plant/d1/telemetry", b'{"deviceName": "d1", "value": 42}', 1)
        c.publish("plant/d1/raw", b'{"deviceName": "d1", "value": 10}', 1)
        while len(got) < 2 and time.monotonic() - t0 < 5:
            time.sleep(0.01)
        c.loop_stop()
        results = {t: (orjson.loads(p), at - t0) for t, p, at in got}
        body, took = results["plant/d1/alarm"]
        assert body == {"deviceName": "d1", "value": 42, "alarm": True, "limit": 30}
        assert took < 1.0, f"the alarm took {took:.3f}s"
        assert results["plant/d1/calibrated"][0] == {"deviceName": "d1", "raw": 10, "value": 9.7}
    finally:
        assert up.stop() == 0
    assert up.pids() == []


def test_embedded_port_taken_says_how_to_use_the_running_broker(tmp_path, broker):
    env = _env(tmp_path, f"embedded://127.0.0.1:{broker.port}")
    out = subprocess.run([sys.executable, "-m", "pipeline", "up", "-c", str(ROOT / "conf" / "example.yaml"),
                          "--run-dir", str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 4, out.stdout + out.stderr
    assert f"127.0.0.1:{broker.port}" in out.stderr and "PIPELINE_BROKER_URL=mqtt://" in out.stderr


def test_three_over_limit_alarms_from_the_third_reading_in_a_row_per_device():
    model = loader.load("three_over_limit", ROOT / "models" / "three_over_limit")
    try:
        states: dict[str, dict] = {}  # what egress keeps per key: each call sees its key's state as the last left it
        context = loader.Context("r", model.name, {"limit": 30}, logging.getLogger("test"))

        def reading(device: str, value: float) -> tuple[int, bool]:
            context.key, context.state = device, states.setdefault(device, {})
            out = model.handler({"deviceName": device, "value": value}, context)
            assert (out["deviceName"], out["value"], out["limit"]) == (device, value, 30)
            return out["over"], out["alarm"]

        assert [reading("a", v) for v in (31, 40, 30.5)] == [(1, False), (2, False), (3, True)]
        assert reading("b", 35) == (1, False)  # another device's run is its own
        assert [reading("a", v) for v in (99, 30)] == [(4, True), (0, False)]  # still over; at the limit: reset
        assert states["a"] == {} and states["b"] == {"over": 1}  # a device under the limit keeps nothing
        assert [reading("b", v) for v in (31, 32, 10, 31)] == [(2, False), (3, True), (0, False), (1, False)]
        context.state = None
        with pytest.raises(ValueError, match="give its rule a key"):
            model.handler({"deviceName": "a", "value": 50}, context)
    finally:
        loader.unload(model.name)
