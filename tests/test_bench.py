"""`pipeline loadgen` and `pipeline bench` on a real Mosquitto: counts, sequence numbers, pacing, report.

No timing assertions beyond loose checks that sends are spread out rather than bursted.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from pipeline.commands import cli
from pipeline.commands.bench import loadgen, procstat, runner
from pipeline.commands.bench.receiver import analyse, percentile
from tests.conftest import ROOT, Mosquitto, free_port


def pipeline_cmd(*args: str, timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the bench stops the stack it started
        out, _ = proc.communicate(timeout=40)
        pytest.fail(f"pipeline {args[0]} did not finish in {timeout}s:\n{out.decode(errors='replace')}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out.decode(errors="replace"))


# --- pure parts -------------------------------------------------------------------------------------


def test_pacer_waits_when_ahead_and_slips_instead_of_bursting():
    p = loadgen.Pacer(100)  # one message every 10 ms
    p.start(0.0)
    assert p.delay(0, 0.0) == 0
    assert p.delay(1, 0.001) == pytest.approx(0.009)
    assert p.delay(5, 0.100) == 0  # 50 ms late: the schedule slips, keeping only SLACK to catch up on
    assert p.slipped == pytest.approx(0.050 - loadgen.SLACK)
    assert p.max_behind == pytest.approx(0.050)
    due_now = sum(1 for i in range(6, 20) if p.delay(i, 0.100) == 0)
    assert due_now <= loadgen.SLACK / p.interval + 1
    assert loadgen.Pacer(0).delay(10**6, 0.0) == 0  # unpaced


@pytest.mark.parametrize("shape", ["flat", "pyboot"])
def test_payload_shapes_carry_seq_and_send_time(shape):
    msg = orjson.loads(loadgen.builder(shape)(7, "d3", 1700000000.25))
    assert (msg["seq"], msg["ts"]) == (7, 1700000000.25)
    if shape == "flat":
        assert set(msg) == {"seq", "ts", "deviceName", "pointName", "value"} and msg["deviceName"] == "d3"
    else:
        assert msg["deviceInfo"]["deviceName"] == "d3" and msg["telemetry"]["ts"] == 1700000000250
    assert abs(len(loadgen.builder(shape, 300)(1234, "d3", time.time())) - 300) <= 5  # ts and seq vary in length


def test_analyse_counts_loss_duplicates_and_stale_results():
    def rec(t: float, seq: int, ts: float) -> tuple[float, bytes]:
        return t, orjson.dumps({"seq": seq, "ts": ts})

    records = [rec(10.001, 0, 10.0), rec(10.012, 1, 10.01), rec(10.013, 1, 10.01), rec(10.05, 3, 10.03),
               rec(10.06, 2, 5.0), rec(10.07, 99, 10.04), (10.08, b"not json")]
    r = analyse(records, sent=4, since=9.0)
    assert (r.delivered, r.lost, r.duplicates, r.stale, r.unparsed) == (3, 1, 1, 2, 1)
    assert r.latency_ms["p50"] == pytest.approx(2.0) and r.latency_ms["max"] == pytest.approx(20.0)
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0 and percentile([], 99) == 0.0


def test_topics_labels_and_arguments():
    assert runner.input_topic("bench/q0/+/in") == "bench/q0/{device}/in"
    assert runner.input_topic("a/+/+/#") == "a/{device}/x/x"
    assert runner.output_filter("bench/q0/{2}/out") == "bench/q0/+/out"
    assert procstat.label(["/v/bin/python", "-m", "pipeline", "worker", "--rule", "r1", "-c", "f"]) == "worker:r1"
    assert procstat.label(["pipeline", "worker", "--rule", "r2", "--run-dir", "/d"]) == "worker:r2"  # a forked one
    assert procstat.label(["/v/bin/python", "-m", "supervisor.supervisord", "-n", "-c", "x"]) == "supervisord"
    args = cli.parser().parse_args(["bench", "-c", "x.yaml", "--rates", "1000,max", "--qos", "1", "--duration", "5s"])
    assert (args.rates, args.qos, args.duration) == ([1000.0, 0.0], [1], 5.0)


# --- against Mosquitto ------------------------------------------------------------------------------


def test_loadgen_sends_exactly_n_evenly_paced(broker: Mosquitto, probe_factory, tmp_path: Path):
    probe = probe_factory("lg/#")
    n, rate = 500, 250.0
    out = pipeline_cmd("loadgen", "--url", broker.url, "--topic", "lg/{device}/t", "--devices", "7",
                       "--rate", str(rate), "-n", str(n), "--qos", "1", "--json", str(tmp_path / "lg.json"),
                       timeout=30)
    assert out.returncode == 0, out.stdout
    assert f"sent {n} messages" in out.stdout and f"PUBACKs: {n}/{n}" in out.stdout
    got = probe.wait_for(n, timeout=10, topic_prefix="lg/")
    msgs = [orjson.loads(p) for _, p in got]
    assert sorted(m["seq"] for m in msgs) == list(range(n))
    assert {t for t, _ in got} == {f"lg/d{k}/t" for k in range(7)}
    summary = orjson.loads((tmp_path / "lg.json").read_bytes())
    assert summary["sent"] == summary["acked"] == n
    ts = [m["ts"] for m in sorted(msgs, key=lambda m: m["seq"])]
    expected = (n - 1) / rate
    assert expected * 0.9 <= ts[-1] - ts[0] <= expected + summary["slipped"] + 1.0
    gaps = [b - a for a, b in zip(ts, ts[1:], strict=False)]
    assert 0.6 / rate <= statistics.median(gaps) <= 1.5 / rate
    assert sum(g < 0.25 / rate for g in gaps) <= 0.15 * len(gaps)  # spread out, not bursts


def test_loadgen_unpaced_pyboot(broker: Mosquitto, probe_factory):
    probe = probe_factory("pb/#")
    out = pipeline_cmd("loadgen", "--url", broker.url, "--topic", "pb/{device}", "--devices", "3", "--rate", "max",
                       "-n", "2000", "--shape", "pyboot", "--payload-bytes", "200", timeout=30)
    assert out.returncode == 0, out.stdout
    assert "unpaced" in out.stdout
    got = probe.wait_for(2000, timeout=10, topic_prefix="pb/")
    assert len(got) == 2000
    first = orjson.loads(got[0][1])
    assert first["deviceInfo"]["deviceType"] == "sensor" and "temperature" in first["telemetry"]
    assert abs(len(got[0][1]) - 200) <= 5


def test_bench_short_run_reports_every_message(broker: Mosquitto, tmp_path: Path):
    out_json = tmp_path / "bench.json"
    env = {"BENCH_BROKER_URL": broker.url, "BENCH_CONTROL_LISTEN": f"127.0.0.1:{free_port()}"}
    out = pipeline_cmd("bench", "-c", str(ROOT / "conf" / "bench.yaml"), "--rates", "200", "--duration", "2s",
                       "--qos", "0,1", "--json", str(out_json), timeout=90, env=env)
    assert out.returncode == 0, out.stdout
    assert "summary" in out.stdout and "echo-qos1" in out.stdout
    doc = orjson.loads(out_json.read_bytes())
    assert {"config", "finished", "host", "settings", "runs"} <= set(doc)
    assert [(r["qos"], r["rate"]) for r in doc["runs"]] == [(0, 200.0), (1, 200.0)]
    for r in doc["runs"]:
        assert {"offered", "sent", "delivered", "lost", "duplicates", "throughput", "latency_ms", "stages",
                "loadgen"} <= set(r)
        assert r["sent"] == 400 and r["delivered"] == r["sent"] and r["lost"] == 0 and r["duplicates"] == 0
        assert set(r["latency_ms"]) == {"p50", "p90", "p99", "max"}
        assert {"ingress", "egress", "worker:echo-qos0", "worker:echo-qos1", "loadgen"} <= set(r["stages"])
        assert all(u["rss_mib"] > 0 for u in r["stages"].values())
