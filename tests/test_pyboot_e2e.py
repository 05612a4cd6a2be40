"""The acceptance of the compatibility work: an old runtime's (pyboot v3) config, unchanged but for its addresses,
and an old-style model zip served over HTTP, through `pipeline up`: the results equal what the old handler
returns for the same input, device filters included (evaluated without eval)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import orjson
from test_packages import FileServer, digests
from test_pyboot import old_style_zip

OLD = """
mqtts:
  - {name: edge, broker: "tcp://127.0.0.1:PORT", qos: 1, retain: false}
rules:
  - name: boiler
    sub: {name: edge, clientId: boiler-sub, topic: "plant/+/telemetry", timeout: 10}
    pub: {name: edge, clientId: boiler-pub, topic: plant/boiler/result}
    funcs:
      - name: trend
        modelName: trend
        modelMd5: MD5
        modelAddress: URL
        devices:
          - deviceName: boiler-1
            deviceAttr:
              - {name: deviceName, value: boiler-1, expression: '== data_to_dict["deviceInfo"]["deviceName"]'}
              - {name: pointName, value: temp, expression: 'in data_to_dict["telemetry"]'}
          - deviceName: boiler-2
            deviceAttr:
              - {name: deviceName, value: boiler-2, expression: "== data_to_dict['deviceInfo']['deviceName']"}
control: {listen: CONTROL}
"""


def event(device: str, **telemetry: float) -> dict:
    return {"deviceInfo": {"deviceName": device, "pointName": "temp"}, "telemetry": {"ts": 1700000000000, **telemetry}}


EVENTS = [event("boiler-1", temp=21.5), event("boiler-1", pressure=2.0), event("boiler-2", temp=80.0),
          event("boiler-3", temp=99.0), event("boiler-1", temp=-4.25), event("boiler-2", temp=3.0, pressure=1.5)]
PASSES = [True, False, True, False, True, True]  # boiler-1 needs temp in its telemetry; boiler-2 needs nothing


def old_handler(archive: bytes, tmp_path: Path, events: list[dict]) -> list:
    """What the old runtime returned: its zip unpacked, index.py imported from the model folder, handler called."""
    where = tmp_path / "old-runtime"
    zipfile.ZipFile(io.BytesIO(archive)).extractall(where)
    script = ("import json, sys; sys.path.insert(0, '.'); import index; "
              "print(json.dumps([index.handler(e, None) for e in json.load(sys.stdin)]))")
    out = subprocess.run([sys.executable, "-c", script], cwd=where / "trend", input=json.dumps(events),
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_old_config_and_old_zip_through_pipeline_up(broker, probe_factory, stack_factory, tmp_path):
    archive = old_style_zip(tmp_path)
    files = FileServer()
    try:
        url = files.serve("/group1/M00/00/0F/trend.zip", archive)
        old = OLD.replace("PORT", str(broker.port)).replace("MD5", digests(archive)[2]).replace("URL", url)
        up = stack_factory(old, "--workers", "boiler-trend=2")
        assert files.hits == ["/group1/M00/00/0F/trend.zip"]  # fetched once by `pipeline up`, not per worker
    finally:
        files.stop()
    probe = probe_factory("plant/boiler/result", "pipeline/errors/#")
    for seq, e in enumerate(EVENTS):
        probe.publish(f"plant/b{seq}/telemetry", e)
    expected = old_handler(archive, tmp_path, [e for e, passes in zip(EVENTS, PASSES, strict=True) if passes])
    got = probe.wait_for(len(expected), timeout=30)
    time.sleep(1.0)  # nothing more may come: the others were filtered out
    results = [orjson.loads(p) for _, p in probe.received()]
    key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
    assert sorted(results, key=key) == sorted(expected, key=key) and len(got) == len(expected) == 4
    assert {r["temp"] for r in results if r["deviceName"] == "boiler-1"} == {44.0, -7.5}  # scaler: x * 2 + 1
    rule = next(s for s in up.get("/stages")[1]["stages"] if s["name"] == "rule:boiler-trend")
    assert rule["counters"].get("filtered") == 2 and rule["errors"] == 0
    model = up.get("/models")[1]["models"][0]
    assert model["name"] == "trend" and model["sha256"] == digests(archive)[0] and model["configured"] == url
