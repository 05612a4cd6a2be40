"""The control API on fake snapshots (falcon's TestClient), the stats board, and the status table."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, make_server

import falcon.testing
import msgpack
import pytest
import zmq
from conftest import HERE
from prometheus_client.parser import text_string_to_metric_families

from pipeline.commands import cli, status
from pipeline.config import load as config
from pipeline.control import board as board_mod
from pipeline.control.app import create_app
from pipeline.control.board import Board
from pipeline.telemetry.aggregation import quantile
from pipeline.telemetry.reporter import BUCKETS, Reporter
from pipeline.wire.endpoints import Endpoints

SECRET = "s3cret-PASSWORD"
NB = len(BUCKETS) + 1


def make_cfg(tmp_path: Path, **workers: int) -> config.Config:
    rule = {"sub": {"broker": "local", "topic": "in/+/data"}, "model": "probe", "pub": {"broker": "local",
            "topic": "out/{1}"}}
    data = {"brokers": {"local": {"url": "mqtt://user:urlpass@127.0.0.1:1883", "username": "u", "password": SECRET}},
            "models": {"probe": {"path": str(HERE / "models" / "probe"), "params": {"api_key": "PARAM-KEY"}},
                       "unused": {"path": str(HERE / "models" / "withinit")}},
            "rules": [{**rule, "name": "first", "workers": 2}, {**rule, "name": "second"}]}
    return config.parse(data, tmp_path / "pipeline.yaml").with_workers(workers)


def hist(**at: int) -> list[int]:
    """Bucket counts with `n` observations in the bucket whose upper bound is at[...]: hist(b5=3) = 3 at 5 ms."""
    counts = [0] * NB
    for key, n in at.items():
        counts[BUCKETS.index(float(key[1:]) / 1000)] += n
    return counts


def snap(stage: str, pid: int, rule: str | None = None, alive: bool = True, t: float = 100.0, **fields) -> dict:
    return {"stage": stage, "rule": rule, "pid": pid, "started": 1.0, "time": t, "alive": alive, "counters": {},
            "histograms": {}, "rss_bytes": 1000 + pid, "cpu_seconds": 0.5, **fields}


class Fake:
    def __init__(self, procs: list[dict]) -> None:
        self.procs = procs

    def processes(self) -> list[dict]:
        return [dict(p) for p in self.procs]


def healthy() -> list[dict]:
    """A stack after a worker restart: worker 11 of rule first died, 12 replaced it; 13 is its second worker."""
    ok = {"local": "connected"}
    return [
        snap("ingress", 1, counters={"received": 1000, "dispatched.first": 1000, "dispatched.second": 1000,
                                     "dispatched": 2000}, brokers=ok, protocols={"local": "5"}, depth=4,
             prev={"time": 98.0, "counters": {"received": 200}, "histograms": {}}),
        snap("rule", 11, "first", alive=False, counters={"received": 300, "processed": 290, "errors": 10},
             histograms={"call": hist(b1=300)}),
        snap("rule", 12, "first", counters={"received": 400, "processed": 400}, histograms={"call": hist(b5=400)},
             prev={"time": 98.0, "counters": {"processed": 100}, "histograms": {"call": hist(b5=100)}},
             model="probe", sha256="abc", source="/m/probe", loaded_at=50.0),
        snap("rule", 13, "first", counters={"received": 250, "processed": 250}, histograms={"call": hist(b5=250)},
             model="probe", sha256="abc", source="/m/probe", loaded_at=40.0),
        snap("rule", 21, "second", counters={"received": 1000, "processed": 1000}),
        snap("egress", 31, counters={"received": 1900, "published": 1890, "error_records": 10}, brokers=ok,
             protocols={"local": "3.1.1"},
             histograms={"end_to_end.first": hist(b10=900), "end_to_end.second": hist(b10=1000)}),
    ]


@pytest.fixture
def cfg(tmp_path: Path) -> config.Config:
    return make_cfg(tmp_path)


def client(cfg: config.Config, procs: list[dict]) -> falcon.testing.TestClient:
    return falcon.testing.TestClient(create_app(cfg, Fake(procs)), headers={"Host": "localhost"})


def test_stages_sum_dead_and_live_pids_in_flow_order(cfg):
    doc = client(cfg, healthy()).simulate_get("/stages").json
    names = [s["name"] for s in doc["stages"]]
    assert names == ["ingress", "rule:first", "rule:second", "egress"]
    ing, first, second, egr = doc["stages"]
    assert ing | {"counters": None} == {
        "name": "ingress", "up": True, "received": 1000, "dispatched": 2000, "unrouted": 0, "depth": 4,
        "in_flight": None, "rate_per_s": 400.0, "brokers": {"local": "connected"}, "counters": None}
    assert (first["received"], first["processed"], first["errors"]) == (950, 940, 10)  # the dead pid counts
    assert (first["workers"], first["workers_alive"], first["up"]) == (2, 2, True)
    assert first["depth"] == 1000 - 950 and first["in_flight"] == 50
    assert first["rate_per_s"] == 150.0  # only live pids with an older snapshot: (400 - 100) / 2 s
    assert first["latency_ms"] == {"p50": pytest.approx(3.75), "p99": pytest.approx(4.975)}  # recent: 300 at 5 ms
    assert second["depth"] == 0 and second["latency_ms"] == {"p50": None, "p99": None}
    assert egr["received"] == 1900 and egr["published"] == 1890 and egr["depth"] == 1950 - 1900
    assert time.time() - doc["time"] < 5


def test_stale_processes_make_their_stage_down_and_readyz_503(cfg):
    procs = [p | {"alive": False} if p["stage"] in ("rule", "egress") and p.get("rule") != "second" else p
             for p in healthy()]
    c = client(cfg, procs)
    first = c.simulate_get("/stages").json["stages"][1]
    assert (first["up"], first["workers_alive"], first["rate_per_s"]) == (False, 0, 0.0)
    assert first["processed"] == 940  # counts stay exact
    r = c.simulate_get("/readyz")
    assert r.status_code == 503
    assert r.json == {"ready": False, "problems": ["rule:first is down", "egress is down"]}


def test_readyz_names_a_disconnected_broker_and_is_200_when_all_is_well(cfg):
    c = client(cfg, healthy())
    assert c.simulate_get("/readyz").status_code == 200
    assert c.simulate_get("/healthz").json == {"status": "ok"}
    procs = healthy()
    procs[0]["brokers"] = {"local": "disconnected"}
    r = client(cfg, procs).simulate_get("/readyz")
    assert r.status_code == 503 and r.json["problems"] == ["ingress: broker local is disconnected"]
    r = client(cfg, []).simulate_get("/readyz")
    assert r.status_code == 503 and "ingress is down" in r.json["problems"]


def test_per_rule_queues_of_ingress_count_in_the_rule_and_outbox_in_egress(cfg):
    procs = healthy()
    procs[0].update(depth=130, rules={"first": {"pending": 120, "in_flight": 60, "at_workers": 7},
                                      "second": {"pending": 0}}, unacked={"local": 70})
    procs[-1]["outbox"] = {"rows": 5, "bytes": 500, "full": False}
    ing, first, second, egr = client(cfg, procs).simulate_get("/stages").json["stages"]
    assert (ing["depth"], ing["in_flight"]) == (10, 70)
    assert (first["depth"], first["in_flight"]) == (127, 7)
    assert egr["depth"] == 50 + 5 and egr["outbox"]["rows"] == 5
    q = client(cfg, procs).simulate_get("/queue_size_metrics").json["queue_size_metrics"]
    assert q[0] == {"sub_process_name": "first", "pre_queue": 127, "post_queue": 50 + 5}


def test_queue_size_metrics_in_the_old_shape(cfg):
    doc = client(cfg, healthy()).simulate_get("/queue_size_metrics").json
    assert doc == {"queue_size_metrics": [
        {"sub_process_name": "first", "pre_queue": 50, "post_queue": 940 + 10 - 900},
        {"sub_process_name": "second", "pre_queue": 0, "post_queue": 0}]}


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_parse_with_counters_histograms_and_processes(cfg):
    r = client(cfg, healthy()).simulate_get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    s = _samples(r.text)
    assert s[("pipeline_rule_processed_total", (("rule", "first"),))] == 940
    assert s[("pipeline_ingress_received_total", ())] == 1000
    assert s[("pipeline_ingress_dispatched_by_rule_total", (("rule", "second"),))] == 1000
    assert s[("pipeline_stage_depth", (("rule", "first"), ("stage", "rule")))] == 50
    assert s[("pipeline_stage_up", (("rule", ""), ("stage", "egress")))] == 1
    assert s[("pipeline_broker_connected", (("broker", "local"), ("stage", "ingress")))] == 1
    assert s[("pipeline_rule_workers", (("rule", "first"),))] == 2
    call = {k[1]: v for k, v in s.items() if k[0] == "pipeline_rule_call_seconds_bucket" and ("rule", "first") in k[1]}
    assert call[(("le", "0.001"), ("rule", "first"))] == 300  # cumulative: 300 at 1 ms, then 650 more at 5 ms
    assert call[(("le", "0.0025"), ("rule", "first"))] == 300
    assert call[(("le", "0.005"), ("rule", "first"))] == 950 == call[(("le", "+Inf"), ("rule", "first"))]
    rss = {dict(k[1])["pid"]: v for k, v in s.items() if k[0] == "pipeline_process_resident_memory_bytes"}
    assert rss == {"1": 1001, "12": 1012, "13": 1013, "21": 1021, "31": 1031}  # live processes only
    assert s[("pipeline_process_cpu_seconds_total", (("pid", "12"), ("rule", "first"), ("stage", "rule")))] == 0.5


def test_rules_never_show_a_password(cfg):
    r = client(cfg, healthy()).simulate_get("/rules")
    assert SECRET not in r.text and "urlpass" not in r.text and "PARAM-KEY" not in r.text
    doc = r.json
    assert [x["name"] for x in doc["rules"]] == ["first", "second"]
    assert doc["rules"][0]["workers"] == 2 and doc["rules"][0]["sub"]["topic"] == "in/+/data"
    assert doc["rules"][1]["error_topic"] == "pipeline/errors/second"
    assert doc["brokers"]["local"] == {"url": "mqtt://127.0.0.1:1883", "username": "u", "password_set": True,
                                       "keepalive_s": 30, "protocol": "auto",
                                       "protocol_in_use": {"ingress": "5", "egress": "3.1.1"}}


def test_models_from_worker_snapshots_else_from_config(cfg):
    doc = client(cfg, healthy()).simulate_get("/models").json["models"]
    probe, unused = doc
    assert probe["name"] == "probe" and probe["rules"] == ["first", "second"]
    assert (probe["sha256"], probe["source"], probe["loaded_at"]) == ("abc", "/m/probe", 50.0)
    assert probe["workers_loaded"] == 2 and "PARAM-KEY" not in str(doc)
    assert unused["rules"] == [] and unused["sha256"] is None
    assert unused["source"] == str(HERE / "models" / "withinit")
    cold = client(cfg, []).simulate_get("/models").json["models"][0]
    assert cold["source"] == str(HERE / "models" / "probe") and cold["loaded_at"] is None


def test_dashboard_page_and_its_static_files(cfg):
    c = client(cfg, [])
    page = c.simulate_get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for ref in ("static/dashboard.js", "static/dashboard.css"):
        assert ref in page.text
        r = c.simulate_get("/" + ref)
        assert r.status_code == 200 and len(r.content) > 500
    assert "http" not in c.simulate_get("/static/dashboard.js").text.replace("http://www.w3.org", "")  # no CDN
    assert c.simulate_get("/static/missing.js").status_code == 404


def test_quantile_interpolates_inside_buckets():
    assert quantile([0] * NB, 0.5) is None
    assert quantile(hist(b1=10), 0.5) == pytest.approx(0.00075)  # half way between 0.5 ms and 1 ms
    assert quantile(hist(b1=50, b10=50), 0.99) == pytest.approx(0.005 + 0.005 * 49 / 50)
    assert quantile([0] * (NB - 1) + [3], 0.5) == BUCKETS[-1]  # +Inf bucket: the last finite bound


def test_board_keeps_dead_and_reused_pids_and_measures_over_its_window(monkeypatch):
    b = Board()
    b.put({"stage": "rule", "rule": "r", "pid": 7, "started": 1.0, "time": 10.0, "counters": {"processed": 5}}, now=0)
    b.put({"stage": "rule", "rule": "r", "pid": 7, "started": 1.0, "time": 11.0, "counters": {"processed": 9}}, now=1)
    b.put({"stage": "rule", "rule": "r", "pid": 7, "started": 2.0, "time": 12.0, "counters": {"processed": 1}}, now=2)
    procs = sorted(b.processes(now=3.5), key=lambda p: p["started"])
    assert [p["alive"] for p in procs] == [False, True]  # the first one silent for 2.5 s; same pid, new process
    assert procs[0]["prev"]["counters"] == {"processed": 5} and "prev" not in procs[1]
    monkeypatch.setattr(board_mod, "RETIRE_AFTER", 5.0)
    b.put({"stage": "rule", "rule": "r", "pid": 8, "started": 3.0, "time": 20.0, "counters": {"processed": 2},
           "histograms": {"call": [1, 2]}}, now=10)
    procs = b.processes(now=10)
    retired = [p for p in procs if p["pid"] is None]
    assert len(procs) == 2 and retired[0]["counters"] == {"processed": 10} and retired[0]["retired"] == 2
    assert sum(p["counters"]["processed"] for p in procs) == 12


def test_board_receives_reporter_snapshots_over_zmq_and_ignores_garbage(tmp_path):
    eps = Endpoints("ipc", tmp_path)
    b = Board(eps).start()
    try:
        pub = zmq.Context.instance().socket(zmq.PUB)
        pub.connect(eps.address("stats"))
        rep = Reporter.connect(eps, "rule", "r")
        rep.count("processed", 3)
        deadline = time.monotonic() + 10
        while not b.processes() and time.monotonic() < deadline:
            pub.send(b"\xc1 not msgpack")
            pub.send(msgpack.packb({"no": "pid"}))
            rep.tick(force=True)
            time.sleep(0.1)
        procs = b.processes()
        assert len(procs) == 1 and procs[0]["counters"] == {"processed": 3} and procs[0]["alive"]
        rep.close()
        pub.close(linger=0)
    finally:
        b.stop()


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def test_status_prints_the_stages_table_and_fails_when_unreachable(cfg, capsys):
    server = make_server("127.0.0.1", 0, create_app(cfg, Fake(healthy())), handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"127.0.0.1:{server.server_port}"
        assert cli.main(["status", "--url", url]) == 0
        out = capsys.readouterr().out
        for text in ("ingress", "rule:first", "rule:second", "egress", "940", "2/2", "ready"):
            assert text in out
    finally:
        server.shutdown()
        server.server_close()
    assert cli.main(["status", "--url", url]) == 1
    assert "cannot read" in capsys.readouterr().out


def test_status_url_comes_from_the_config_file(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(f"""
brokers: {{local: {{url: mqtt://127.0.0.1:1883}}}}
models: {{probe: {{path: {HERE}/models/probe}}}}
rules: [{{name: r, sub: {{broker: local, topic: a}}, model: probe, pub: {{broker: local, topic: b}}}}]
control: {{listen: "0.0.0.0:6123"}}
""")
    assert status.base_url(None, str(path)) == "http://127.0.0.1:6123"
    assert status.base_url("http://h:1/", str(path)) == "http://h:1"
    assert status.base_url(None, None) == "http://127.0.0.1:5888"


def test_the_pipeline_parser_has_status_without_loading_rich():
    code = ("import sys; from pipeline.commands import cli; cli.parser().parse_args(['status']); "
            "print('rich' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
