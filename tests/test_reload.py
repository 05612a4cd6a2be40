"""Hot reload through `pipeline up` (real Mosquitto, real supervisord): POST /models/{name}/reload under a steady
QoS 1 load loses nothing and switches versions cleanly; the token guards it; a broken new version leaves the old
one serving and says why; SIGHUP reloads what changed."""

from __future__ import annotations

import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import orjson
import pytest
import yaml
from conftest import Up, wait_until
from falcon import testing
from test_control import Fake as Snapshots
from test_packages import FileServer, digests, zip_bytes

from pipeline.config import load as config
from pipeline.control.app import create_app
from pipeline.supervision import reload

TOKEN = "reload-test-token-0123456789"
CONFIG = """
brokers:
  local: {url: BROKER}
models:
  versioned: {path: MODEL}
rules:
  - name: live
    sub: {broker: local, topic: "rl/+/in", qos: 1}
    model: versioned
    pub: {broker: local, topic: "rl/{1}/out", qos: 1}
    workers: 2
    timeout: 5s
control: {listen: CONTROL, token: TOKEN}
"""
MODEL = '''import os
import time

VERSION = "{version}"


def init(context):
    time.sleep(0.5)  # a model that takes a while to load
    {init_extra}


def handler(event, context):
    return {{"seq": event["seq"], "version": VERSION, "pid": os.getpid()}}
'''


def write_model(folder: Path, version: str, init_extra: str = "pass") -> None:
    folder.mkdir(exist_ok=True)
    (folder / "index.py").write_text(MODEL.format(version=version, init_extra=init_extra))


def start(stack_factory, broker, tmp_path: Path, token: str | None = TOKEN) -> Up:
    write_model(tmp_path / "model", "v1")
    text = CONFIG.replace("BROKER", broker.url).replace("MODEL", str(tmp_path / "model"))
    text = text.replace("TOKEN", token) if token else text.replace(", token: TOKEN", "")
    return stack_factory(text)


def post(up: Up, path: str, token: str | None = TOKEN) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"http://{up.control}{path}", method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=180) as r:
            return r.status, orjson.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, orjson.loads(e.read())


class Publisher(threading.Thread):
    """n QoS 1 messages at `rate` a second on a schedule; `sent` is how many went out so far."""

    def __init__(self, probe, n: int, rate: float) -> None:
        super().__init__(daemon=True)
        self.probe, self.n, self.rate, self.sent = probe, n, rate, 0

    def run(self) -> None:
        t0 = time.monotonic()
        for seq in range(self.n):
            ahead = t0 + seq / self.rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
            self.probe.publish(f"rl/d{seq % 10}/in", {"seq": seq})
            self.sent = seq + 1


def outputs(probe) -> dict[int, set[str]]:
    """seq -> versions it came out with (a message sent again may come out twice)."""
    out: dict[int, set[str]] = {}
    for _, payload in probe.received("rl/"):
        body = orjson.loads(payload)
        out.setdefault(body["seq"], set()).add(body["version"])
    return out


def wait_all(probe, n: int, timeout: float) -> dict[int, set[str]]:
    wait_until(lambda: len(outputs(probe)) >= n, timeout, step=0.3)
    return outputs(probe)


def live_versions(up: Up) -> set[str]:
    model = up.get("/models")[1]["models"][0]
    return {w["sha256"] for w in model["workers"]}


def test_reload_under_load_loses_nothing_and_switches_versions(broker, probe_factory, stack_factory, tmp_path):
    up = start(stack_factory, broker, tmp_path)
    probe = probe_factory("rl/+/out")
    old = live_versions(up)
    n = 8000
    publisher = Publisher(probe_factory(), n, 1000.0)
    publisher.start()
    time.sleep(2.0)
    write_model(tmp_path / "model", "v2")
    status, result = post(up, "/models/versioned/reload")
    boundary = publisher.sent  # every message from here on was published after the reload finished
    publisher.join()
    assert status == 200, result
    assert result["ok"] and result["changed"] and result["workers_replaced"] == 2 and result["rules"] == ["live"]
    assert result["previous"] == sorted(old) and result["version"] not in old
    assert boundary < n, "the reload took longer than the load: nothing was published after it"
    got = wait_all(probe, n, timeout=90)
    assert sorted(got) == list(range(n)), f"{n - len(got)} message(s) lost"
    assert set().union(*got.values()) == {"v1", "v2"}
    late = {seq: v for seq, v in got.items() if seq >= boundary and v != {"v2"}}
    assert not late, f"old-version results after the reload: {sorted(late)[:10]}"
    model = up.get("/models")[1]["models"][0]
    assert model["sha256"] == result["version"]
    assert wait_until(lambda: live_versions(up) == {result["version"]}, 10, step=0.3)
    assert model["reload"]["ok"] and model["reload"]["version"] == result["version"]
    # the spare's last report counts as live for 2 s after it stopped
    assert wait_until(lambda: up.get("/models")[1]["models"][0]["workers_loaded"] == 2, 10, step=0.3)
    assert up.proc.poll() is None


def test_the_token_guards_reload_and_a_broken_version_keeps_the_old_one(broker, probe_factory, stack_factory,
                                                                        tmp_path):
    up = start(stack_factory, broker, tmp_path)
    probe = probe_factory("rl/+/out")
    old = live_versions(up)
    status, body = post(up, "/models/versioned/reload", token=None)
    assert status == 403 and "Bearer" in body["description"]
    assert post(up, "/models/versioned/reload", token="wrong-token-wrong-token")[0] == 403
    assert post(up, "/models/nothing/reload")[0] == 404
    write_model(tmp_path / "model", "v2", init_extra="raise RuntimeError('weights.bin is missing')")
    status, result = post(up, "/models/versioned/reload")
    assert status == 422 and not result["ok"], result
    assert "init(context) failed: RuntimeError: weights.bin is missing" in result["error"]
    assert result["running"] == sorted(old)
    time.sleep(1.5)  # `pipeline up` would have stopped the stack by now had it taken the failure as fatal
    assert up.proc.poll() is None and live_versions(up) == old
    for seq in range(20):
        probe.publish("rl/d1/in", {"seq": seq})
    got = wait_all(probe, 20, timeout=30)
    assert sorted(got) == list(range(20)) and set().union(*got.values()) == {"v1"}
    model = up.get("/models")[1]["models"][0]
    assert model["sha256"] in old and model["reload"]["ok"] is False
    assert "weights.bin is missing" in model["reload"]["error"]


def test_without_a_token_reload_is_disabled(broker, stack_factory, tmp_path):
    up = start(stack_factory, broker, tmp_path, token=None)
    status, body = post(up, "/models/versioned/reload")
    assert status == 403 and "control.token" in body["description"]


def test_sighup_reloads_the_models_that_changed(broker, probe_factory, stack_factory, tmp_path):
    up = start(stack_factory, broker, tmp_path)
    probe = probe_factory("rl/+/out")
    old = live_versions(up)
    write_model(tmp_path / "model", "v2")
    up.proc.send_signal(signal.SIGHUP)
    record = wait_until(lambda: up.get("/models")[1]["models"][0]["reload"], 90, step=0.3)
    assert record and record["ok"] and record["trigger"] == "sighup", record
    assert record["previous"] == sorted(old)  # a stopped worker's last report counts for 2 s more:
    assert wait_until(lambda: live_versions(up) == {record["version"]}, 10, step=0.3)
    for seq in range(20):
        probe.publish("rl/d1/in", {"seq": seq})
    got = wait_all(probe, 20, timeout=30)
    assert sorted(got) == list(range(20)) and set().union(*got.values()) == {"v2"}
    assert up.proc.poll() is None


# ------------------------------------------------------------------------ the API and the reloader, no stack

def unit_config(tmp_path: Path, control: dict | None = None, **models: dict) -> Path:
    write_model(tmp_path / "model", "v1")
    doc = yaml.safe_load(CONFIG.replace("BROKER", "mqtt://127.0.0.1:1883").replace("MODEL", str(tmp_path / "model"))
                         .replace("CONTROL", "127.0.0.1:5999").replace("TOKEN", TOKEN))
    doc["control"] = control if control is not None else doc["control"]
    doc["models"].update(models)
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(doc))
    return tmp_path / "pipeline.yaml"


WORKER = {"stage": "rule", "rule": "live", "pid": 7, "started": 1.0, "time": 10.0, "alive": True, "counters": {},
          "histograms": {}, "model": "versioned", "sha256": "abc", "source": "/m", "loaded_at": 5.0}


def client(tmp_path: Path, control: dict | None = None, run_dir: Path | None = None, **models: dict):
    cfg = config.load(unit_config(tmp_path, control, **models))
    return testing.TestClient(create_app(cfg, Snapshots([WORKER]), run_dir), headers={"Host": "localhost"})


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_mutations_are_disabled_without_a_token(tmp_path):
    c = client(tmp_path, control={"listen": "127.0.0.1:5999"})
    r = c.simulate_post("/models/versioned/reload", headers=bearer(TOKEN))
    assert r.status_code == 403 and r.json["title"] == "disabled" and "control.token" in r.json["description"]
    assert c.simulate_get("/models").status_code == 200


def test_the_token_is_checked(tmp_path):
    c = client(tmp_path)
    for headers in ({}, bearer("not-the-token-at-all"), {"Authorization": f"Basic {TOKEN}"}):
        r = c.simulate_post("/models/versioned/reload", headers=headers)
        assert r.status_code == 403 and r.json["title"] == "token required", headers
    assert c.simulate_post("/models/nothing/reload", headers=bearer(TOKEN)).status_code == 404
    assert c.simulate_post("/models/versioned/reload", headers=bearer(TOKEN)).status_code == 503  # no stack
    assert c.simulate_get("/stages").status_code == 200  # reads stay open by default


def test_protect_reads(tmp_path):
    c = client(tmp_path, control={"listen": "127.0.0.1:5999", "token": TOKEN, "protect_reads": True})
    assert c.simulate_get("/stages").status_code == 403 and c.simulate_get("/metrics").status_code == 403
    assert c.simulate_get("/stages", headers=bearer(TOKEN)).status_code == 200
    assert c.simulate_get("/healthz").status_code == 200 and c.simulate_get("/readyz").status_code != 403


def test_models_document_shows_sources_workers_and_the_last_reload(tmp_path):
    run_dir = tmp_path / "run"
    c = client(tmp_path, run_dir=run_dir, remote={"url": "http://user:pw@files/r.zip", "insecure": True})
    by_name = {m["name"]: m for m in c.simulate_get("/models").json["models"]}
    versioned, remote = by_name["versioned"], by_name["remote"]
    assert versioned["workers"] == [{"pid": 7, "rule": "live", "model": "versioned", "sha256": "abc",
                                     "loaded_at": 5.0, "alive": True}]
    assert versioned["sha256"] == "abc" and versioned["reload"] is None
    assert versioned["configured"] == versioned["path"] == str(tmp_path / "model")
    assert remote["path"] is None and remote["source"] == remote["configured"] == "http://files/r.zip"
    assert "pw" not in c.simulate_get("/models").text
    reload.save(run_dir, {"model": "versioned", "ok": False, "error": "nope"})
    shown = {m["name"]: m["reload"] for m in c.simulate_get("/models").json["models"]}
    assert shown == {"versioned": {"model": "versioned", "ok": False, "error": "nope"}, "remote": None}


def reloader(tmp_path: Path, **models: dict) -> reload.Reloader:
    running = config.load(unit_config(tmp_path, **models))
    return reload.Reloader(running, tmp_path / "run", Snapshots([WORKER]).processes)


def test_a_reload_refuses_changed_rules_and_keeps_the_running_version(tmp_path):
    r = reloader(tmp_path)
    path = tmp_path / "pipeline.yaml"
    path.write_text(path.read_text().replace("rl/{1}/out", "rl/{1}/changed"))
    result = r.reload("versioned")
    assert not result["ok"] and "rules in" in result["error"] and "changed since the stack started" in result["error"]
    assert result["running"] == ["abc"] and reload.last(tmp_path / "run", "versioned") == result


def test_a_reload_with_a_bad_checksum_names_model_url_and_digests(tmp_path):
    files = FileServer()
    try:
        archive = zip_bytes({"index.py": b"def handler(e, c):\n    return e\n"})
        url = files.serve("/v2.zip", archive)
        r = reloader(tmp_path, remote={"url": url, "sha256": "3" * 64, "insecure": True})
        cfg = yaml.safe_load((tmp_path / "pipeline.yaml").read_text())
        cfg["rules"][0]["model"] = "remote"
        (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(cfg))
        r.running = config.load(tmp_path / "pipeline.yaml")
        result = r.reload("remote")
    finally:
        files.stop()
    assert not result["ok"]
    assert f"model 'remote': checksum mismatch for {url}: expected sha256 {'3' * 64}, got {digests(archive)[0]}" \
        in result["error"]


def test_one_reload_at_a_time(tmp_path):
    r = reloader(tmp_path)
    with reload._lock(tmp_path / "run"), pytest.raises(reload.Busy):
        r.reload("versioned")
