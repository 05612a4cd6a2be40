"""Fault injection: 20,000 QoS 1 messages at 1,000/s through `pipeline up` while something breaks.

Every sequence number must come out at least once (on the output topic, or on the error topic for the
messages made to fail). Each test prints a line with sent, received, duplicates and recovery time, and
appends it to tests/artifacts/faults.jsonl.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import orjson
import paho.mqtt.client as mqtt
import pytest
from conftest import Mosquitto, processes

N, RATE = 20_000, 1000.0
ARTIFACTS = Path(__file__).parent.parent / "artifacts"

CONFIG = """
brokers:
  local: {url: BROKER}
models:
  probe: {path: MODELS/probe}
rules:
  - name: faults
    sub: {broker: local, topic: "f/+/in", qos: 1}
    model: probe
    pub: {broker: local, topic: "f/{1}/out", qos: 1}
    workers: WORKERS
    timeout: TIMEOUT
    max_attempts: ATTEMPTS
control: {listen: CONTROL}
"""


class Collector:
    """A persistent-session subscriber: sees everything published while it is away once it is back. By
    default on the outputs and error records; a witness subscribes to the inputs instead."""

    def __init__(self, port: int, topics: tuple[str, ...] = ("f/+/out", "pipeline/errors/#"),
                 name: str = "collector") -> None:
        self.seen: dict[int, int] = {}
        self.errors: dict[int, dict] = {}
        self.arrivals: list[float] = []
        self.lock = threading.Lock()
        c = self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{name}-{port}",
                                      clean_session=False)
        ready = threading.Event()
        c.on_connect = lambda cl, *_: cl.subscribe([(t, 1) for t in topics])
        c.on_subscribe = lambda *_: ready.set()
        c.on_message = self._got
        c.reconnect_delay_set(0.2, 1)
        c.connect("127.0.0.1", port)
        c.loop_start()
        assert ready.wait(5)

    def _got(self, _c, _u, m) -> None:
        body = orjson.loads(m.payload)
        with self.lock:
            self.arrivals.append(time.monotonic())
            if m.topic.startswith("pipeline/errors/"):
                self.errors[orjson.loads(body["payload"])["seq"]] = body
            else:
                self.seen[body["seq"]] = self.seen.get(body["seq"], 0) + 1

    def missing(self) -> set[int]:
        with self.lock:
            return set(range(N)) - self.seen.keys() - self.errors.keys()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def publish(port: int, payload_for=lambda seq: {}, n: int = N, topic_for=lambda seq: f"f/d{seq % 50}/in",
            rate: float = RATE) -> threading.Thread:
    """Publish `n` QoS 1 messages evenly paced at `rate`, message `seq` on `topic_for(seq)` with payload
    {"seq": seq, **payload_for(seq)}; paho re-sends what a broker restart interrupts."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"loader-{port}", clean_session=False)
    c.max_inflight_messages_set(100)
    c.max_queued_messages_set(0)
    c.reconnect_delay_set(0.2, 1)
    c.connect("127.0.0.1", port)
    c.loop_start()

    def body() -> None:
        t0 = time.monotonic()
        for seq in range(n):
            delay = t0 + seq / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            c.publish(topic_for(seq), orjson.dumps({"seq": seq, **payload_for(seq)}), 1)

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.client = c
    return t


def run_fault(name: str, broker: Mosquitto, stack_factory, inject, *, workers: int = 2, timeout: str = "2s",
              attempts: int = 3, payload_for=lambda seq: {}, at: float = 5.0, limit: float = 120.0) -> Collector:
    cfg = (CONFIG.replace("BROKER", broker.url).replace("WORKERS", str(workers)).replace("TIMEOUT", timeout)
           .replace("ATTEMPTS", str(attempts)))
    up = stack_factory(cfg)
    col = Collector(broker.port)
    t0 = time.monotonic()
    loader = publish(broker.port, payload_for)
    time.sleep(at)
    fault_at = time.monotonic()
    inject(up)
    deadline = time.monotonic() + limit
    while col.missing() and time.monotonic() < deadline:
        time.sleep(0.5)
    loader.join(1)
    loader.client.loop_stop()
    col.close()
    report(name, col, fault_at, t0)
    missing = col.missing()
    assert not missing, (f"{name}: {len(missing)} of {N} never came out, e.g. {sorted(missing)[:10]}\n"
                         f"GET /stages: {_stages(up)}\n{up.output()[-4000:]}")
    return col


def _stages(up) -> str:
    try:
        return json.dumps(up.get("/stages")[1]["stages"])
    except OSError as e:
        return f"unavailable ({e})"


def report(name: str, col: Collector, fault_at: float, t0: float, n: int = N) -> None:
    after = [t for t in col.arrivals if t >= fault_at]
    gaps = [b - a for a, b in zip([fault_at, *after], after, strict=False)]
    line = {
        "fault": name, "sent": n, "received": sum(col.seen.values()) + len(col.errors),
        "distinct": len(col.seen) + len(col.errors), "error_records": len(col.errors),
        "duplicates": sum(n - 1 for n in col.seen.values()),
        "recovery_s": round(max(gaps, default=0.0), 2), "total_s": round((col.arrivals or [t0])[-1] - t0, 1),
    }
    print("\nFAULT", json.dumps(line))
    ARTIFACTS.mkdir(exist_ok=True)
    with (ARTIFACTS / "faults.jsonl").open("a") as f:
        f.write(json.dumps(line) + "\n")


def kill(up, needle: str, count: int = 1) -> None:
    mine = set(up.pids())  # once: each call reads all of /proc, which takes seconds per process on a busy box
    pids = [p for p, cmd in processes().items() if p in mine and needle in cmd][:count]
    assert pids, f"no process matching {needle!r}"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


def test_kill_worker(pbroker, stack_factory):
    run_fault("kill -9 worker", pbroker, stack_factory, lambda up: kill(up, "pipeline worker"))


def test_kill_egress(pbroker, stack_factory):
    run_fault("kill -9 egress", pbroker, stack_factory, lambda up: kill(up, "pipeline egress"))


def test_kill_ingress(pbroker, stack_factory):
    run_fault("kill -9 ingress", pbroker, stack_factory, lambda up: kill(up, "pipeline ingress"))


def test_restart_broker(pbroker, stack_factory):
    def restart(_up) -> None:
        pbroker.stop()
        pbroker.start()

    run_fault("broker restart", pbroker, stack_factory, restart)


def test_broker_down_20s(pbroker, stack_factory):
    def outage(_up) -> None:
        pbroker.stop()
        time.sleep(20)
        pbroker.start()

    run_fault("broker down 20 s", pbroker, stack_factory, outage, at=3.0)


def test_model_hangs_on_one_in_100(pbroker, stack_factory):
    col = run_fault("model hangs on 1 in 100", pbroker, stack_factory, lambda up: None, workers=4,
                    timeout="300ms", attempts=1, payload_for=lambda seq: {"sleep": 30} if seq % 100 == 50 else {},
                    at=0.0)
    unexpected = Counter(e["error"][:60] for seq, e in col.errors.items() if seq % 100 != 50)
    assert not unexpected, f"error records for messages that do not hang: {unexpected.most_common(5)}"
    assert sorted(col.errors) == list(range(50, N, 100))
    assert all(e["reason"] == "timeout" and "timeout after 0.3s" in e["error"] for e in col.errors.values())


def test_crashing_message_is_retried_on_another_worker(pbroker, stack_factory):
    col = run_fault("worker dies on first attempt, 1 in 1000", pbroker, stack_factory, lambda up: None,
                    payload_for=lambda seq: {"crash_on_attempt": 1} if seq % 1000 == 500 else {}, at=0.0)
    assert not col.errors  # each came out on the second attempt


# --------------------------------------------------------------------------------- faults that come together

def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "run" in metafunc.fixturenames:
        metafunc.parametrize("run", range(metafunc.config.getoption("repeat")))


def restart_broker(broker: Mosquitto, down: float) -> None:
    broker.stop()
    time.sleep(down)
    broker.start()


CHAOS = {  # each step: seconds after the previous one, what breaks
    "worker, egress, ingress 4 s apart, then the broker down 3 s": [
        (5.0, lambda up, b: kill(up, "pipeline worker")), (4.0, lambda up, b: kill(up, "pipeline egress")),
        (4.0, lambda up, b: kill(up, "pipeline ingress")), (4.0, lambda up, b: restart_broker(b, 3.0))],
    "the broker down 3 s while egress restarts": [
        (5.0, lambda up, b: (b.stop(), kill(up, "pipeline egress"), time.sleep(3.0), b.start()))],
}


def settled(up) -> bool:
    """Every depth of `GET /stages` is 0."""
    try:
        return all(s["depth"] == 0 for s in up.get("/stages")[1]["stages"])
    except (OSError, KeyError):
        return False


def through_chaos(name: str, broker: Mosquitto, up, loader: threading.Thread, witness: Collector, col: Collector,
                  n: int) -> set:
    """Take the steps of CHAOS[name] while `loader` publishes `n` messages; then wait (150 s at most) until the
    loader is done, the witness (a Collector on the inputs) saw all `n` or nothing more for 5 s, and every key of
    `witness.seen` came out in `col` (in `seen` or `errors`); then up to 30 s more for the stages to settle. Close
    the loader, witness and collector; return the keys the witness saw that never came out."""
    t0, taken = time.monotonic(), []
    for delay, step in CHAOS[name]:
        time.sleep(delay)
        taken.append(round(time.monotonic() - t0, 1))
        step(up, broker)
    print(f"CHAOS {name!r}: steps taken {taken} s after the loader started")
    deadline = time.monotonic() + 150
    lost: set = set()
    witnessed, still_since = -1, time.monotonic()
    while time.monotonic() < deadline:
        with witness.lock, col.lock:
            lost = witness.seen.keys() - col.seen.keys() - col.errors.keys()
            if len(witness.seen) != witnessed:
                witnessed, still_since = len(witness.seen), time.monotonic()
        done_witnessing = witnessed == n or time.monotonic() - still_since > 5.0  # all, or nothing more comes
        if not lost and not loader.is_alive() and done_witnessing:
            break
        time.sleep(0.5)
    loader.join(1)
    loader.client.loop_stop()
    deadline = time.monotonic() + 30
    while not settled(up) and time.monotonic() < deadline:
        time.sleep(0.5)
    witness.close()
    col.close()
    return lost


@pytest.mark.parametrize("name", list(CHAOS))
def test_faults_that_come_together(pbroker, stack_factory, name, run):
    """25,000 QoS 1 messages at 1,000/s while the steps of CHAOS[name] happen; a witness with a persistent
    session on the input topics sees what the broker had to deliver, and all of that must come out."""
    n = 25_000
    cfg = (CONFIG.replace("BROKER", pbroker.url).replace("WORKERS", "2").replace("TIMEOUT", "2s")
           .replace("ATTEMPTS", "3"))
    up = stack_factory(cfg)
    witness = Collector(pbroker.port, ("f/+/in",), name="witness")
    col = Collector(pbroker.port)
    t0 = time.monotonic()
    lost = through_chaos(name, pbroker, up, publish(pbroker.port, n=n), witness, col, n)
    report(f"{name} (run {run + 1})", col, t0, t0, n)
    unseen = set(range(n)) - witness.seen.keys() - col.seen.keys() - col.errors.keys()
    print(f"CHAOS {name!r} run {run + 1}: witness saw {len(witness.seen)}, lost {len(lost)}, "
          f"seen by nobody {len(unseen)}")
    assert not lost, (f"{len(lost)} the broker had never came out, e.g. {sorted(lost)[:10]}\n"
                      f"GET /stages: {_stages(up)}\n{up.output()[-4000:]}")
    assert settled(up), f"a depth is not 0 once everything came out: {_stages(up)}"
