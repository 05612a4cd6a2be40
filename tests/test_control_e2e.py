"""The control API of a real stack (`pipeline up`, a real Mosquitto): backlog under load, metrics, readiness."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import urllib.request

from conftest import ROOT
from prometheus_client.parser import text_string_to_metric_families

SLOW = """
brokers:
  local: {url: BROKER}
models:
  probe: {path: MODELS/probe, params: {tag: slow}}
rules:
  - name: slow
    sub: {broker: local, topic: "load/+/data", qos: 1}
    model: probe
    pub: {broker: local, topic: "done/{1}", qos: 1}
    timeout: 5s
control: {listen: CONTROL}
"""


def stage(up, name: str) -> dict:
    return next(s for s in up.get("/stages")[1]["stages"] if s["name"] == name)


def wait_until(check, timeout: float, what: str, step: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(step)
    raise AssertionError(f"not {what} after {timeout}s (last: {check()})")


def publish_paced(probe, n: int, per_s: float, event: dict) -> None:
    """n messages at per_s messages a second, on a schedule (not sleeping a fixed time after each)."""
    t0 = time.monotonic()
    for seq in range(n):
        ahead = t0 + seq / per_s - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
        probe.publish(f"load/d{seq % 10}/data", {**event, "seq": seq})


class Sampler(threading.Thread):
    """Reads /stages every 0.2 s in the background; keeps (monotonic time, rule stage) pairs."""

    def __init__(self, up, name: str) -> None:
        super().__init__(daemon=True)
        self.up, self.name, self.samples, self.done = up, name, [], threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            try:
                self.samples.append((time.monotonic(), stage(self.up, self.name)))
            except OSError:
                pass


def test_backlog_grows_under_load_then_drains_to_exact_counts(broker, probe_factory, stack_factory):
    up = stack_factory(SLOW.replace("BROKER", broker.url), "--workers", "slow=1")
    probe = probe_factory()
    sampler = Sampler(up, "rule:slow")
    sampler.start()
    n = 3000
    publish_paced(probe, n, 500.0, {"sleep": 0.005})
    sampler.done.set()
    sampler.join()
    depths = [s["depth"] for _, s in sampler.samples]
    assert len(depths) >= 10, "too few /stages samples during the load"
    assert max(depths) >= 200, f"the rule's depth did not grow under load: {depths}"
    assert max(depths[len(depths) // 2:]) > max(depths[:len(depths) // 4]), f"no growth: {depths}"

    def drained() -> list | None:
        doc = up.get("/stages")[1]["stages"]
        ok = all(s["depth"] == 0 for s in doc) and doc[1]["processed"] == n and doc[-1]["published"] == n
        return doc if ok else None

    ing, rule, egr = wait_until(drained, 120, "drained")
    assert ing["received"] == n and ing["dispatched"] == n
    assert rule["received"] == n and rule["errors"] == 0 and rule["workers_alive"] == 1
    assert rule["latency_ms"]["p50"] >= 5.0  # the model sleeps 5 ms per message
    assert egr["received"] == n
    assert up.get("/queue_size_metrics")[1] == {"queue_size_metrics": [
        {"sub_process_name": "slow", "pre_queue": 0, "post_queue": 0}]}


def test_metrics_models_rules_and_status_on_a_real_stack(broker, probe_factory, stack_factory):
    up = stack_factory(SLOW.replace("BROKER", broker.url))
    probe = probe_factory("done/#")
    for seq in range(20):
        probe.publish("load/d1/data", {"seq": seq})
    assert len(probe.wait_for(20, timeout=30)) == 20
    wait_until(lambda: stage(up, "rule:slow")["processed"] == 20, 10, "counted")
    with urllib.request.urlopen(f"http://{up.control}/metrics", timeout=5) as r:
        families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
    processed = families["pipeline_rule_processed"].samples
    assert [(s.labels, s.value) for s in processed if s.name.endswith("_total")] == [({"rule": "slow"}, 20.0)]
    call = [s for s in families["pipeline_rule_call_seconds"].samples if s.labels.get("le") == "+Inf"]
    assert call[0].value == 20
    assert {s.labels["stage"] for s in families["pipeline_process_resident_memory_bytes"].samples} >= {
        "ingress", "rule", "egress"}
    model = up.get("/models")[1]["models"][0]
    assert model["name"] == "probe" and model["rules"] == ["slow"] and len(model["sha256"]) == 64
    assert model["loaded_at"] <= time.time() and model["workers_loaded"] == 1
    assert up.get("/rules")[1]["rules"][0]["pub"]["topic"] == "done/{1}"
    out = subprocess.run([sys.executable, "-m", "pipeline", "status", "-c", str(up.config)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "rule:slow" in out.stdout and "ready" in out.stdout and "20 processed" in out.stdout
    rc, text = watch_status(up.config, tables=3)
    assert rc == 0 and text.count("pipeline stages") >= 3 and "20 processed" in text


def watch_status(config, tables: int) -> tuple[int, str]:
    """`pipeline status -c CONFIG --watch` into a pipe until it printed `tables` tables, then Ctrl-C."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "status", "-c", str(config), "--watch",
                             "--interval", "0.2"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if sum("pipeline stages" in x for x in lines) >= tables:
            break
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=30)
    return proc.returncode, "".join(lines) + rest


def test_readyz_follows_the_broker_down_and_back(broker, stack_factory):
    up = stack_factory(SLOW.replace("BROKER", broker.url))
    assert up.get("/readyz")[0] == 200
    broker.stop()
    try:

        def not_ready() -> dict | None:
            code, doc = up.get("/readyz")
            return doc if code == 503 else None

        t0 = time.monotonic()
        doc = wait_until(not_ready, 5, "503", step=0.1)
        assert time.monotonic() - t0 <= 5.0
        assert any("broker local" in p for p in doc["problems"]), doc
    finally:
        broker.start()
    wait_until(lambda: up.get("/readyz")[0] == 200, 60, "ready again")
    assert up.get("/readyz")[1] == {"ready": True, "problems": []}
