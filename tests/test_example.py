"""The README's first command: conf/example.yaml with the embedded (amqtt) broker, as a new user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import orjson
import paho.mqtt.client as mqtt
from conftest import ROOT, Up, free_port, wait_port


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
