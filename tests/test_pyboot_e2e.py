"""The acceptance of the compatibility work, per version of the old format: the example file of that version,
unchanged but for its broker, model addresses and checksum, run by `pipeline up` on a real Mosquitto with an
old-style model zip served over HTTP. What comes out is compared with what the old runtime would have published
for the same messages, computed here by doing what it did (its expressions through `eval`, on this test's own
data; `handler(event, None)`; `json.dumps` of every result but None, "{}" and "null")."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import zipfile
from io import BytesIO
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from conftest import cli
from test_packages import FileServer, digests
from test_pyboot import DATA, PLACEHOLDER, old_style_zip

FILES = "http://127.0.0.1:8080"  # where the examples' model addresses point
CONTROL = "control: {listen: CONTROL}\n"  # a native section added to an old file: the test's own control port

# What the old runtime did for one message and one func: how many of the func's devices selected it (each one
# ran the model once), then the model, then its publishing rule. Run in the model's folder, as it imported it.
OLD_RUNTIME = r"""
import json, sys
sys.path.insert(0, ".")
import index

def selected(func, version, data_to_dict):
    if version == 1:
        name, point = func.get("deviceName"), func.get("pointName")
        return int(bool(name) and data_to_dict["deviceInfo"]["deviceName"] == name
                   and (not point or point in data_to_dict["telemetry"]))
    if version == 2:
        names = {"data_to_dict": data_to_dict}
        return sum(1 for d in func.get("device") or []
                   if eval(f"'{d['deviceName']}' {d['deviceParseExpression']}", names)
                   and eval(f"'{d['pointName']}' {d['pointParseExpression']}", names))
    count = 0
    for d in func.get("devices") or []:
        passed = False
        for attr in d["deviceAttr"]:  # each test overwrote the one before
            passed = eval(f"'{attr['attrValue']}' {attr['attrExpression']}")
        count += bool(passed)
    return count

spec = json.load(sys.stdin)
published = []
for event in spec["events"]:
    for func in spec["funcs"]:
        for _ in range(selected(func, spec["version"], event)):
            try:
                result = index.handler(event, None)
            except Exception as e:
                published.append("internal exception: " + str(e))
                continue
            if result is None or result in ("{}", "null"):
                continue
            published.append(json.dumps(result))
print(json.dumps(published))
"""


def old_runtime(archive: bytes, tmp_path: Path, version: int, funcs: list[dict], events: list[dict]) -> list[str]:
    """The payloads the old runtime would have published for `events` on one rule, in order."""
    where = tmp_path / "old-runtime"
    zipfile.ZipFile(BytesIO(archive)).extractall(where)
    folder = next(where.iterdir())  # the zip's one top folder
    out = subprocess.run([sys.executable, "-c", OLD_RUNTIME], cwd=folder, capture_output=True, text=True,
                         input=json.dumps({"version": version, "funcs": funcs, "events": events}), check=True)
    return json.loads(out.stdout)


def telemetry(device: str, ts: int, **points: Any) -> dict[str, Any]:
    """A message in the shape the old runtime's models expect."""
    return {"deviceInfo": {"deviceName": device, "edgeDeviceName": "box-1", "topic": "t"},
            "telemetry": {"ts": ts, **points}, "model_data": {}}


def messages(device: str, point: str | None) -> tuple[list[dict], list[dict]]:
    """(messages of the selected device and point, in every shape of result; messages of no selected device)."""
    p = point or "任意点"
    selected = [telemetry(device, 1, **{p: 0.5}), telemetry(device, 2, **{p: 2.0, "电流": 7}),
                telemetry(device, 3, **{p: 1.0, "mode": "{}"}), telemetry(device, 4, **{p: 1.0, "mode": "null"}),
                telemetry(device, 5, **{p: 1.0, "mode": "none"}), telemetry(device, 6, **{p: 1.0, "mode": "fail"})]
    others = [telemetry(device + "-其他", 7, 其他点=1.0), telemetry("другой", 8, other=3.0)]
    if point:
        others.append(telemetry(device, 9, 其他点=1.0))  # the device, without the point
    return selected, others


CASES = {  # example -> (version, the device and point each func selects)
    "v1-readme": (1, [("泵站-1", "出口温度")]),
    "v2-device": (2, [("泵站-2", "振动")]),
    "v3-devices": (3, [("三厂-压缩机1", "排气压力"), ("三厂-压缩机2", "RC_cylinder1_dispPeak")]),
    "v3-single-address": (3, [("boiler-7", None)]),
}


def served_example(name: str, broker_port: int, files: FileServer, archive: bytes, md5: str | None) -> str:
    """The example file's text with its broker and model addresses pointing here and its checksum `md5` (None:
    as it is); nothing else changed."""
    text = (DATA / f"{name}.yaml").read_text(encoding="utf-8")
    for line in text.splitlines():
        if FILES in line:
            path = line.split(FILES, 1)[1].strip().strip("'\"")
            files.serve(path, archive)
    text = text.replace("tcp://127.0.0.1:1883", f"tcp://127.0.0.1:{broker_port}").replace(FILES, files.url(""))
    if md5 is not None:
        text = text.replace(PLACEHOLDER, md5)
    return text


def publish_topic(sub_topic: str) -> str:
    return sub_topic.replace("+", "b7")


@pytest.mark.parametrize("name", list(CASES))
def test_an_example_file_runs_as_the_old_runtime_did(name, broker, probe_factory, stack_factory, tmp_path):
    version, selections = CASES[name]
    archive = old_style_zip(tmp_path)
    files = FileServer()
    try:
        up = stack_factory(served_example(name, broker.port, files, archive, digests(archive)[2]) + CONTROL)
    finally:
        files.stop()
    assert f"old runtime format, version {version}: converted" in up.output()  # and its warnings, as check says
    raw = yaml.safe_load((DATA / f"{name}.yaml").read_text(encoding="utf-8"))
    rule = raw["rules"][0]
    probe = probe_factory(rule["pub"]["topic"], "pipeline/errors/#")
    selected, others = [], []
    for device, point in selections:
        mine, not_mine = messages(device, point)
        selected += mine
        others += not_mine
    assert old_runtime(archive, tmp_path, version, raw["funcs"], others) == []  # the old runtime published nothing
    expected = old_runtime(archive, tmp_path, version, raw["funcs"], selected)
    for event in others + selected:
        probe.publish(publish_topic(rule["sub"]["topic"]), event, qos=0)
    failures = [p for p in expected if p.startswith("internal exception: ")]
    results = [json.loads(p) for p in expected if p not in failures]
    got = probe.wait_for(len(expected), timeout=30)
    time.sleep(1.0)  # nothing more may come
    published = [orjson.loads(p) for t, p in probe.received() if t == rule["pub"]["topic"]]
    errors = [orjson.loads(p) for t, p in probe.received() if t.startswith("pipeline/errors/")]
    key = lambda r: json.dumps(r, sort_keys=True, ensure_ascii=False)  # noqa: E731
    assert sorted(published, key=key) == sorted(results, key=key) and len(got) == len(expected)
    assert len(results) == 2 * len(selections)  # two plain results per device: "{}", "null" and None are not sent
    assert [e["reason"] for e in errors] == ["model_error"] * len(failures)  # not on the output topic, as before
    assert [e["error"] for e in errors] == [f"ValueError: {f.removeprefix('internal exception: ')}" for f in failures]
    stages = up.get("/stages")[1]["stages"]
    filtered = sum(s["counters"].get("filtered", 0) for s in stages if s["name"].startswith("rule:"))
    assert filtered == len(selections) * len(others + selected) - len(selected)


def test_v3_a_message_that_passes_only_the_last_test_is_not_processed_as_warned(tmp_path):
    """The one difference the v3 examples carry (each warned by `pipeline check`): the old runtime ran the model
    for a message of another device carrying the point; here every test of a device must hold."""
    raw = yaml.safe_load((DATA / "v3-devices.yaml").read_text(encoding="utf-8"))
    event = telemetry("三厂-压缩机9", 1, 排气压力=0.82)
    assert len(old_runtime(old_style_zip(tmp_path), tmp_path, 3, raw["funcs"], [event])) == 1
    from pipeline.config.pyboot import convert
    from pipeline.models.filters import matches

    assert not matches(convert(raw).native["rules"][0]["filter"], event)


@pytest.mark.parametrize("name", list(CASES))
def test_models_fetch_and_check_fetch_accept_each_example(name, tmp_path, monkeypatch):
    archive = old_style_zip(tmp_path)
    files = FileServer()
    try:
        path = tmp_path / f"{name}.yaml"
        path.write_text(served_example(name, 1883, files, archive, digests(archive)[2]), encoding="utf-8")
        monkeypatch.setenv("PIPELINE_DATA_DIR", str(tmp_path / "data"))
        fetched = cli("models", "fetch", "-c", str(path))
        checked = cli("check", "-c", str(path), "--fetch")
    finally:
        files.stop()
    assert fetched.returncode == 0, fetched.stderr
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.count(" OK      sha256 ") == len(CASES[name][1]) and "warning:" in checked.stdout


def test_a_wrong_model_md5_refuses_the_model_naming_it(broker, stack_factory, tmp_path):
    archive = old_style_zip(tmp_path)
    files = FileServer()
    try:
        up = stack_factory(served_example("v3-single-address", broker.port, files, archive, None) + CONTROL,
                           ready=False)
        assert up.proc.wait(60) == 3, up.output()
    finally:
        files.stop()
    actual = digests(archive)[1]
    assert f"model 'industry': checksum mismatch for {files.url('/models/industry.zip')}" in up.output()
    assert f"expected md5 {PLACEHOLDER}" in up.output() and actual in up.output()
    assert not (up.run_dir / "supervisord.conf").exists()  # nothing was started
