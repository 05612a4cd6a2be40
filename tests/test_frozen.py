"""The configuration `pipeline up` leaves for the stages (pipeline.frozen): same values as pipeline.config's,
read only while it still describes the file, and a stage that reads it does not load pydantic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import config, frozen

ROOT = Path(__file__).parent.parent
SECRET = "pw-Zq8-never-print-me"
CONFIGS = [ROOT / "conf" / "example.yaml", ROOT / "conf" / "bench.yaml",
           *sorted((ROOT / "tests" / "data").rglob("*.yaml"))]


def same(a, b) -> None:
    """Everything a stage reads of a config: fields, properties, methods."""
    assert a.model_dump() == b.model_dump()
    assert a.instance == b.instance
    assert (a.default_run_dir(), a.default_data_dir()) == (b.default_run_dir(), b.default_data_dir())
    for n in b.brokers:
        x, y = a.brokers[n], b.brokers[n]
        assert (x.scheme, x.host, x.port, x.embedded) == (y.scheme, y.host, y.port, y.embedded)
        assert (x.password and x.password.get_secret_value()) == (y.password and y.password.get_secret_value())
    for n in b.models:
        assert (a.models[n].source, a.models[n].where) == (b.models[n].source, b.models[n].where)
    assert a.packages.limits() == b.packages.limits()
    for r in b.rules:
        assert a.rule(r.name).error_topic == r.error_topic
        assert a.rule_index(r.name) == b.rule_index(r.name)
    assert (a.control.token and a.control.token.get_secret_value()) == \
        (b.control.token and b.control.token.get_secret_value())


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_round_trip(path, tmp_path, monkeypatch):
    monkeypatch.setenv("MQTT_PASSWORD", SECRET)
    monkeypatch.delenv(frozen.KEY, raising=False)  # write() sets it: undone after the test
    try:
        want = config.load(path)
    except Exception:
        pytest.skip("not a valid configuration on its own")
    assert frozen.write(tmp_path, path)
    assert os.stat(tmp_path / frozen.FILE).st_mode & 0o077 == 0
    text = (tmp_path / frozen.FILE).read_text()
    for secret in [SECRET, *(b.password.get_secret_value() for b in want.brokers.values() if b.password)]:
        assert secret not in text
    got = frozen.read(tmp_path, path)
    assert isinstance(got, frozen.Config)
    same(got, want)
    workers = {r.name: 7 for r in want.rules}
    same(got.with_workers(workers), want.with_workers(workers))
    with pytest.raises(AttributeError):
        got.name = "x"


def test_secrets_need_the_key_write_put_in_the_environment(tmp_path, monkeypatch):
    src = tmp_path / "c.yaml"
    src.write_text((ROOT / "conf" / "example.yaml").read_text().replace("../models", str(ROOT / "models")))
    monkeypatch.setenv("MQTT_USER", "edge")
    monkeypatch.setenv("MQTT_PASSWORD", SECRET)
    monkeypatch.delenv(frozen.KEY, raising=False)
    assert frozen.write(tmp_path, src)
    key = os.environ[frozen.KEY]
    assert frozen.read(tmp_path, src).brokers["local"].password.get_secret_value() == SECRET
    monkeypatch.delenv(frozen.KEY)
    assert frozen.read(tmp_path, src) is None  # a stage supervisord did not get from this `pipeline up`
    monkeypatch.setenv(frozen.KEY, bytes(b ^ 1 for b in bytes.fromhex(key)).hex())
    assert frozen.read(tmp_path, src) is None  # another stack's key


def test_stale_or_foreign_is_not_read(tmp_path, monkeypatch):
    src = tmp_path / "c.yaml"
    src.write_text((ROOT / "conf" / "example.yaml").read_text().replace("../models", str(ROOT / "models")))
    monkeypatch.delenv("PIPELINE_BROKER_URL", raising=False)
    monkeypatch.delenv(frozen.KEY, raising=False)
    assert frozen.write(tmp_path, src)
    assert frozen.read(tmp_path, src) is not None
    monkeypatch.setenv("PIPELINE_BROKER_URL", "mqtt://10.0.0.1:1883")  # a variable the file names changed
    assert frozen.read(tmp_path, src) is None
    monkeypatch.delenv("PIPELINE_BROKER_URL")
    assert frozen.read(tmp_path, src) is not None
    monkeypatch.setenv("SOMETHING_ELSE", "1")  # one it does not name: no matter
    assert frozen.read(tmp_path, src) is not None
    other = tmp_path / "d.yaml"
    other.write_text(src.read_text())
    assert frozen.read(tmp_path, other) is None  # written for another file
    src.write_text(src.read_text() + "\n# edited\n")
    assert frozen.read(tmp_path, src) is None  # the file changed
    (tmp_path / frozen.FILE).write_text("{not json")
    assert frozen.read(tmp_path, src) is None


def test_not_written_when_it_would_not_read_back(tmp_path, monkeypatch):
    monkeypatch.delenv(frozen.KEY, raising=False)
    src = tmp_path / "c.yaml"
    text = (ROOT / "conf" / "example.yaml").read_text().replace("../models", str(ROOT / "models"))
    src.write_text(text.replace("params: {limit: 30}", "params: {limit: 30, since: 2024-01-01}"))
    assert config.load(src).models["threshold"].params["since"]  # a date: JSON has none
    assert not frozen.write(tmp_path, src)
    assert not (tmp_path / frozen.FILE).exists()


def test_a_stage_reading_it_does_not_load_pydantic(tmp_path, monkeypatch):
    monkeypatch.delenv(frozen.KEY, raising=False)
    src = tmp_path / "c.yaml"
    src.write_text((ROOT / "conf" / "example.yaml").read_text().replace("../models", str(ROOT / "models")))
    assert frozen.write(tmp_path, src)
    code = f"""
import sys
from pathlib import Path
from pipeline import cli
import pipeline.ingress, pipeline.egress, pipeline.workers.stage, pipeline.control.server
args = cli.parser().parse_args(["ingress", "-c", {str(src)!r}, "--run-dir", {str(tmp_path)!r}, "--workers",
                                "temperature-alarm=3"])
cfg = cli._stage_config(args, Path(args.run_dir))
print(type(cfg).__module__, cfg.rule("temperature-alarm").workers,
      sorted(m for m in ("pydantic", "yaml", "pipeline.config") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout.split()
    assert out == ["pipeline.frozen", "3", "[]"]
    body = json.loads((tmp_path / frozen.FILE).read_text())
    assert body["source"] == str(src.resolve())
