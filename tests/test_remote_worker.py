"""Workers on another box: `pipeline worker --connect` over tcp with ZMQ CURVE keys (`pipeline keys`).

The stack runs the rule with no local worker (`workers: 0`), so every result must come from a remote worker;
a worker whose key is not authorized, and a socket with no keys at all, must get nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import orjson
import pytest
import zmq
from conftest import cli, free_port

CONFIG = """
brokers:
  local: {url: BROKER}
models:
  probe: {path: MODELS/probe}
rules:
  - name: far
    sub: {broker: local, topic: "in/far", qos: 1}
    model: probe
    pub: {broker: local, topic: "out/far", qos: 1}
    workers: 0
endpoints:
  remote: {listen: 127.0.0.1, base_port: PORT, server_key: keys/stack.key_secret, authorized_keys: authorized}
control: {listen: CONTROL}
"""


def keys(folder: Path, name: str) -> Path:
    done = cli("keys", name, "--dir", str(folder))
    assert done.returncode == 0, done.stderr
    return folder / name


def remote_worker(tmp_path: Path, port: int, key: Path, server: Path, name: str) -> subprocess.Popen:
    log = (tmp_path / f"{name}.log").open("wb")
    args = [sys.executable, "-m", "pipeline", "worker", "-c", str(tmp_path / "pipeline.yaml"), "--rule", "far",
            "--connect", f"127.0.0.1:{port}", "--key", str(key), "--server-key", str(server),
            "--run-dir", str(tmp_path / name)]
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PIPELINE_DATA_DIR": str(tmp_path / f"{name}-data")})


def test_keys_writes_a_private_secret_and_refuses_to_overwrite(tmp_path):
    base = keys(tmp_path, "box")
    assert oct(base.with_suffix(".key_secret").stat().st_mode & 0o777) == "0o600"
    assert b"secret-key" not in base.with_suffix(".key").read_bytes()
    again = cli("keys", "box", "--dir", str(tmp_path))
    assert again.returncode == 2 and "exists; not overwritten" in again.stderr


def test_a_stack_with_a_missing_server_key_exits_2_naming_it(tmp_path, broker):
    (tmp_path / "authorized").mkdir()
    conf = tmp_path / "pipeline.yaml"
    conf.write_text(CONFIG.replace("BROKER", broker.url).replace("MODELS", str(Path(__file__).parent / "models"))
                    .replace("PORT", str(free_port())).replace("CONTROL", f"127.0.0.1:{free_port()}"))
    done = cli("up", "-c", str(conf), "--run-dir", str(tmp_path / "run"))
    assert done.returncode == 2
    assert "endpoints.remote.server_key: cannot read key file" in done.stderr and "stack.key_secret" in done.stderr


def test_a_remote_worker_without_its_keys_is_refused_by_the_cli(tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text("brokers: {b: {url: 'mqtt://127.0.0.1:1'}}\nmodels: {m: {path: .}}\n"
                    "rules: [{name: r, sub: {broker: b, topic: t}, model: m, pub: {broker: b, topic: o}}]\n")
    done = cli("worker", "-c", str(conf), "--rule", "r", "--connect", "127.0.0.1", "--run-dir", str(tmp_path))
    assert done.returncode == 2 and "a remote worker needs --key and --server-key" in done.stderr


def unkeyed_dealer(port: int) -> zmq.Socket:
    """A worker's socket with no CURVE keys at all, asking the rule's ROUTER for messages."""
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.linger = 0
    s.connect(f"tcp://127.0.0.1:{port + 10}")
    s.send(msgpack.packb([0, 64]))  # credit, as a worker would
    return s


def test_only_a_worker_with_authorized_keys_gets_messages(tmp_path, broker, probe_factory, stack_factory):
    port = free_port()
    stack_keys = keys(tmp_path / "keys", "stack")
    good, stranger = keys(tmp_path / "box2", "box2"), keys(tmp_path / "stranger", "stranger")
    (tmp_path / "authorized").mkdir()
    shutil.copy(good.with_suffix(".key"), tmp_path / "authorized")
    up = stack_factory(CONFIG.replace("BROKER", broker.url).replace("PORT", str(port)), ready=False)
    _wait(lambda: _subscribed(up), 30, up)  # published before ingress subscribes, a message reaches no one
    refused = remote_worker(tmp_path, port, stranger.with_suffix(".key_secret"), stack_keys.with_suffix(".key"), "r1")
    bare = unkeyed_dealer(port)
    probe = probe_factory("out/far")
    for seq in range(300):
        probe.publish("in/far", {"seq": seq})
    time.sleep(4)
    assert probe.received() == [] and not bare.poll(100)  # nobody authorized: nothing handed out
    assert refused.poll() is None  # it runs, it just gets nothing
    assert _alive(up) == 0  # its stats are refused too
    assert "refused a remote worker with key" in up.output()
    worker = remote_worker(tmp_path, port, good.with_suffix(".key_secret"), stack_keys.with_suffix(".key"), "r2")
    try:
        got = probe.wait_for(300, timeout=30)
        bodies = [orjson.loads(p) for _, p in got]
        assert sorted(b["seq"] for b in bodies) == list(range(300))  # none lost while nobody could take them
        assert {b["pid"] for b in bodies} == {worker.pid}
        _wait(lambda: _alive(up) == 1, 10, up)
        assert not bare.poll(100)
    finally:
        for p in (worker, refused):
            p.terminate()
            p.wait(15)
        bare.close()
    assert worker.returncode == 0


def _get(up, path: str) -> dict | None:
    try:
        return up.get(path)[1]
    except OSError:
        return None


def _subscribed(up) -> bool:
    doc = _get(up, "/stages")
    return doc is not None and doc["stages"][0].get("brokers", {}).get("local") == "connected"


def _alive(up) -> int:
    return next(s for s in up.get("/stages")[1]["stages"] if s["name"] == "rule:far")["workers_alive"]


def _wait(cond, timeout: float, up) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    pytest.fail(f"condition not met in {timeout}s:\n{up.output()}")
