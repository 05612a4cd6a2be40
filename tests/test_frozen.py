"""The configuration `pipeline up` leaves for the stages (pipeline.config.snapshot): same values as
pipeline.config.load's, read only while it still describes the file, and a stage that reads it does not load
pydantic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import load as config
from pipeline.config import snapshot as frozen
from pipeline.errors import PipelineError

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


def hand_over(run_dir: Path, source: Path, monkeypatch, run: str = "run-1", secrets: bool = True):
    """What `pipeline up` does: validate, write, and put the run id (and the secrets) in the environment."""
    cfg = config.load(source)
    values = frozen.write(run_dir, cfg, run)
    if values is not None:
        monkeypatch.setenv(frozen.RUN, run)
        if secrets:
            monkeypatch.setenv(frozen.SECRETS, json.dumps(values))
        else:
            monkeypatch.delenv(frozen.SECRETS, raising=False)
    return cfg, values


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_round_trip(path, tmp_path, monkeypatch):
    monkeypatch.setenv("MQTT_PASSWORD", SECRET)
    try:
        config.load(path)
    except Exception:
        pytest.skip("not a valid configuration on its own")
    os.umask(0o022)
    want, values = hand_over(tmp_path, path, monkeypatch)
    assert values is not None
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


def example(tmp_path: Path) -> Path:
    src = tmp_path / "c.yaml"
    src.write_text((ROOT / "conf" / "example.yaml").read_text().replace("../models", str(ROOT / "models")))
    return src


def test_secrets_only_in_the_environment_of_the_stages_given_them(tmp_path, monkeypatch):
    src = example(tmp_path)
    monkeypatch.setenv("MQTT_USER", "edge")
    monkeypatch.setenv("MQTT_PASSWORD", SECRET)
    _, values = hand_over(tmp_path, src, monkeypatch)
    assert values == [SECRET]
    assert SECRET not in (tmp_path / frozen.FILE).read_text()
    assert frozen.read(tmp_path, src).brokers["local"].password.get_secret_value() == SECRET
    monkeypatch.delenv(frozen.SECRETS)  # a worker
    withheld = frozen.read(tmp_path, src).brokers["local"].password
    assert isinstance(withheld, frozen.Withheld)
    with pytest.raises(PipelineError, match="without the stack's secrets"):
        withheld.get_secret_value()
    monkeypatch.setenv(frozen.SECRETS, json.dumps([SECRET, "another"]))
    assert frozen.read(tmp_path, src) is None  # not this file's secrets
    assert frozen.withheld_variables(src) == ["MQTT_PASSWORD", "MQTT_USER", "PIPELINE_BROKER_URL",
                                             "PIPELINE_CONTROL_LISTEN"]


def test_another_run_or_file_is_not_read(tmp_path, monkeypatch):
    src = example(tmp_path)
    monkeypatch.delenv("PIPELINE_BROKER_URL", raising=False)
    hand_over(tmp_path, src, monkeypatch)
    assert frozen.read(tmp_path, src) is not None
    monkeypatch.setenv(frozen.RUN, "run-2")
    assert frozen.read(tmp_path, src) is None  # another `pipeline up`
    monkeypatch.delenv(frozen.RUN)
    assert frozen.read(tmp_path, src) is None  # a stage another supervisord started
    monkeypatch.setenv(frozen.RUN, "run-1")
    other = tmp_path / "d.yaml"
    other.write_text(src.read_text())
    assert frozen.read(tmp_path, other) is None  # written for another file
    src.write_text(src.read_text() + "\n# edited\n")
    assert frozen.read(tmp_path, src) is not None  # the stack runs what `pipeline up` validated
    (tmp_path / frozen.FILE).write_text("{not json")
    assert frozen.read(tmp_path, src) is None


def test_not_written_when_it_would_not_read_back(tmp_path, monkeypatch):
    src = tmp_path / "c.yaml"
    text = (ROOT / "conf" / "example.yaml").read_text().replace("../models", str(ROOT / "models"))
    src.write_text(text.replace("params: {limit: 30}", "params: {limit: 30, since: 2024-01-01}"))
    assert config.load(src).models["threshold"].params["since"]  # a date: JSON has none
    assert frozen.write(tmp_path, config.load(src), "run-1") is None
    assert not (tmp_path / frozen.FILE).exists()


def test_a_reload_rewrites_the_models_with_the_same_secrets(tmp_path, monkeypatch):
    src = example(tmp_path)
    monkeypatch.setenv("MQTT_PASSWORD", SECRET)
    hand_over(tmp_path, src, monkeypatch)
    running = frozen.read(tmp_path, src)
    src.write_text(src.read_text().replace("limit: 30", "limit: 31"))
    new = config.load(src)
    assert frozen.rewrite(tmp_path, running.model_copy(update={"models": new.models}))
    got = frozen.read(tmp_path, src)
    assert got.models["threshold"].params == {"limit": 31}
    assert got.brokers["local"].password.get_secret_value() == SECRET
    monkeypatch.setenv(frozen.SECRETS, json.dumps(["not the running one"]))
    assert not frozen.rewrite(tmp_path, running)  # the stages could not read it: no file rather than a wrong one
    assert not (tmp_path / frozen.FILE).exists()


def test_a_stage_reading_it_does_not_load_pydantic(tmp_path, monkeypatch):
    src = example(tmp_path)
    os.chmod(tmp_path, 0o700)
    assert hand_over(tmp_path, src, monkeypatch)[1] is not None
    code = f"""
import sys
from pathlib import Path
from pipeline.commands import cli
from pipeline.stages import boot
import pipeline.stages.ingress, pipeline.stages.egress, pipeline.stages.worker.stage, pipeline.control.server
args = cli.parser().parse_args(["ingress", "-c", {str(src)!r}, "--run-dir", {str(tmp_path)!r}, "--workers",
                                "temperature-alarm=3"])
cfg = boot.stage_config(args, Path(args.run_dir))
print(type(cfg).__module__, cfg.rule("temperature-alarm").workers,
      sorted(m for m in ("pydantic", "yaml", "pipeline.config.load") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout.split()
    assert out == ["pipeline.config.snapshot", "3", "[]"]
    body = json.loads((tmp_path / frozen.FILE).read_text())
    assert body["source"] == str(src.resolve())
