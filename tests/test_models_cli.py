"""Model sources wired in: config keys (path / url / urls / checksums, filter, control token, packages limits),
`pipeline models fetch`, `pipeline check --fetch` against a loopback HTTP server, and workers
loading the resolved version with the rule's filter applied (the old runtime's files: test_pyboot.py)."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_packages import FileServer, digests, zip_bytes

from pipeline.config import load as config
from pipeline.errors import ConfigError, ModelLoadError
from pipeline.models import loader as model
from pipeline.models.packages import Limits
from pipeline.stages.worker.process import Processor
from pipeline.stages.worker.stage import load
from pipeline.wire import frames as envelope

HERE = Path(__file__).parent
ROOT = HERE.parent
INDEX = (b"import os\n\ndef handler(event, context):\n"
         b"    return {'got': event, 'files': sorted(os.listdir(os.path.dirname(__file__)))}\n")
REMOTE = {"url": "https://f/a.zip", "sha256": "a" * 64}  # a valid url model (never fetched)
ARCHIVE = zip_bytes({"trend/index.py": INDEX, "trend/weights.bin": b"\x01" * 100})
BASE = {"brokers": {"local": {"url": "mqtt://127.0.0.1:1883"}},
        "rules": [{"name": "r", "sub": {"broker": "local", "topic": "in/+"}, "model": "m",
                   "pub": {"broker": "local", "topic": "out"}}]}


def pipeline(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def server() -> Iterator[FileServer]:
    s = FileServer()
    yield s
    s.stop()


@pytest.fixture
def clean_imports() -> Iterator[None]:
    """Loading a model edits sys.path and sys.modules: undo it."""
    yield
    for name in model.loaded():
        model.unload(name)


def parse(models: dict[str, Any], tmp_path: Path, **top: Any) -> config.Config:
    return config.parse({**BASE, "models": models, **top}, tmp_path / "pipeline.yaml")


def problems(models: dict[str, Any], tmp_path: Path, **top: Any) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse(models, tmp_path, **top)
    return e.value.problems


# ------------------------------------------------------------------------------------------- config keys

def test_model_sources(tmp_path):
    (tmp_path / "m.tar.gz").write_bytes(b"")
    cfg = parse({"m": {"url": "https://u:pw@files/a.zip", "md5": "pZ4DJ+YhYM9ppHD+VhLi+A=="},
                 "per-arch": {"urls": {"amd64": "https://f/a.zip", "arm64": "https://f/b.zip"}, "sha256": "A" * 64},
                 "plain": {"url": "http://f/c.zip", "insecure": True},
                 "archive": {"path": "m.tar.gz", "sha256": "a" * 64}}, tmp_path)
    m = cfg.models["m"]
    assert (m.path, m.url, m.source.md5) == (None, "https://u:pw@files/a.zip", "pZ4DJ+YhYM9ppHD+VhLi+A==")
    assert m.where == "https://files/a.zip"  # shown without credentials
    assert cfg.models["per-arch"].where == "amd64: https://f/a.zip, arm64: https://f/b.zip"
    assert cfg.models["plain"].source.insecure and not m.source.insecure
    assert cfg.models["archive"].path == tmp_path / "m.tar.gz"
    assert cfg.models["archive"].source.path == tmp_path / "m.tar.gz"


@pytest.mark.parametrize(("spec", "problem"), [
    ({"path": "model", "url": "http://f/a.zip"}, "models.m: give exactly one source: path, or url / urls (both"),
    ({"params": {}}, "models.m: give exactly one source: path, or url / urls (neither path nor url/urls)"),
    ({"url": "ftp://user:secret@f/a.zip"}, "models.m.url: expected an http:// or https:// url (got 'ftp://f/a.zip')"),
    ({"urls": {"riscv": "http://f/a.zip"}}, "models.m.urls.riscv"),
    ({"url": "http://f/a.zip", "sha256": "abc"}, "models.m.sha256: sha256 'abc' is not 64 hex digits"),
    ({"url": "http://f/a.zip", "md5": "nope"}, "models.m.md5: md5 'nope' is neither 32 hex digits"),
    ({"path": "model", "md5": "pZ4DJ+YhYM9ppHD+VhLi+A=="}, "models.m.md5: a checksum applies to an archive"),
    ({"path": "model/index.py"}, "models.m.path: a model is a folder or a .zip holding index.py"),
    ({"url": "http://user:secret@f/a.zip", "sha256": "a" * 64},
     "models.m.url: plain http: anyone on the way can change the archive; give an https:// url, or insecure: true "
     "to accept it (got 'http://f/a.zip')"),
    ({"urls": {"arm64": "http://f/a.zip"}, "url": "https://f/b.zip", "md5": "pZ4DJ+YhYM9ppHD+VhLi+A=="},
     "models.m.urls.arm64: plain http"),
    ({"url": "https://user:secret@f/a.zip"}, "models.m.sha256: a url model needs a checksum: give sha256"),
    ({"path": "model", "insecure": True}, "models.m.insecure: insecure applies to url models"),
])
def test_bad_model_sources_name_their_key(tmp_path, spec, problem):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "index.py").write_bytes(INDEX)
    found = problems({"m": spec}, tmp_path)
    assert any(p.startswith(problem) for p in found), found
    assert "secret" not in str(found)


@pytest.mark.parametrize(("filter", "problem"), [
    ({"path": ["a"], "op": "~=", "value": 1}, "rules[0].filter.op: expected one of ==, !=, contains"),
    ({"any": [{"path": [], "op": "==", "value": 1}]}, "rules[0].filter.any[0].path: expected a non-empty list"),
    ({"all": [], "eval": "x"}, "rules[0].filter: 'all' must be the only key"),
])
def test_bad_filters_name_their_key(tmp_path, filter, problem):
    base = {**BASE, "rules": [{**BASE["rules"][0], "filter": filter}]}
    with pytest.raises(ConfigError) as e:
        config.parse({**base, "models": {"m": REMOTE}}, tmp_path / "p.yaml")
    assert any(p.startswith(problem) for p in e.value.problems), e.value.problems


@pytest.mark.parametrize(("control", "problem"), [
    ({"token": "short-secret"}, "control.token: expected a string of at least 16 characters"),
    ({"protect_reads": True}, "control.protect_reads: protect_reads needs control.token"),
])
def test_control_token_rules(tmp_path, control, problem):
    found = problems({"m": REMOTE}, tmp_path, control=control)
    assert any(p.startswith(problem) for p in found) and "short-secret" not in str(found), found


def test_token_from_an_unset_variable_means_none_and_packages_limits(tmp_path, monkeypatch):
    monkeypatch.delenv("PT_TOKEN", raising=False)
    text = yaml.safe_dump({**BASE, "models": {"m": REMOTE},
                           "control": {"token": "${PT_TOKEN:-}"},
                           "packages": {"max_bytes": "2MiB", "retries": 0, "read_timeout": "500ms"}})
    (tmp_path / "p.yaml").write_text(text)
    cfg = config.load(tmp_path / "p.yaml")
    assert cfg.control.token is None
    assert cfg.packages.limits() == Limits(max_bytes=2 << 20, retries=0, read_timeout=0.5)
    monkeypatch.setenv("PT_TOKEN", "t" * 20)
    assert config.load(tmp_path / "p.yaml").control.token.get_secret_value() == "t" * 20


# ------------------------------------------------------------------------------ models fetch, check --fetch

def fetch_config(tmp_path: Path, server: FileServer, sha256: str | None = None) -> Path:
    sha, _, md5 = digests(ARCHIVE)
    (tmp_path / "local").mkdir(exist_ok=True)
    (tmp_path / "local" / "index.py").write_bytes(INDEX)
    models = {"m": {"url": server.serve("/group1/M00/trend.zip", ARCHIVE), "md5": md5, "insecure": True},
              "shaped": {"url": server.url("/group1/M00/trend.zip"), "sha256": sha256 or sha, "insecure": True},
              "local": {"path": "local"}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({**BASE, "models": models, "data_dir": "data",
                                                     "packages": {"retries": 0}}))
    return tmp_path / "p.yaml"


def test_models_fetch_downloads_verifies_and_reuses_the_cache(tmp_path, server):
    path = fetch_config(tmp_path, server)
    out = pipeline("models", "fetch", "-c", path)
    assert out.returncode == 0, out.stderr
    sha = digests(ARCHIVE)[0]
    folder = tmp_path / "data" / "models" / "m" / sha / "model" / "trend"
    assert f"m                OK      sha256 {sha[:12]}  {folder}" in out.stdout
    assert (folder / "weights.bin").is_file() and "local            OK" in out.stdout
    assert server.hits == ["/group1/M00/trend.zip"] * 2  # one per model: each has its own cache
    server.stop()
    again = pipeline("models", "fetch", "-c", path)  # verified versions are reused without network
    assert again.returncode == 0 and again.stdout == out.stdout


def test_models_fetch_checksum_mismatch_exits_3_naming_model_url_and_digests(tmp_path, server):
    wrong = "0" * 64
    path = fetch_config(tmp_path, server, sha256=wrong)
    out = pipeline("models", "fetch", "-c", path)
    assert out.returncode == 3
    url, actual = server.url("/group1/M00/trend.zip"), digests(ARCHIVE)[0]
    assert f"model 'shaped': checksum mismatch for {url}: expected sha256 {wrong}, got {actual}" in out.stderr
    assert "shaped           FAILED" in out.stdout and "m                OK" in out.stdout
    assert list((tmp_path / "data" / "models" / "shaped").glob("*")) == []  # nothing half-installed


def test_check_stays_offline_unless_fetch(tmp_path, server):
    path = fetch_config(tmp_path, server)
    out = pipeline("check", "-c", path)
    assert out.returncode == 0 and server.hits == [] and "models (" not in out.stdout
    out = pipeline("check", "-c", path, "--fetch")
    assert out.returncode == 0 and ": OK (stack" in out.stdout and "shaped           OK" in out.stdout
    bad = fetch_config(tmp_path / "data", server, sha256="1" * 64)
    out = pipeline("check", "-c", bad, "--fetch")
    assert out.returncode == 3 and ": OK (stack" in out.stdout
    assert "model 'shaped': checksum mismatch" in out.stderr and f"expected sha256 {'1' * 64}, got" in out.stderr


def test_unreachable_url_is_a_model_load_error(tmp_path):
    path = tmp_path / "p.yaml"
    models = {"m": {"url": "http://127.0.0.1:9/m.zip", "insecure": True}}
    path.write_text(yaml.safe_dump({**BASE, "models": models, "data_dir": "d",
                                    "packages": {"retries": 1, "backoff": "10ms"}}))
    out = pipeline("models", "fetch", "-c", path)
    assert out.returncode == 3
    assert "model 'm': download of http://127.0.0.1:9/m.zip failed after 2 attempt(s)" in out.stderr


def test_pipeline_up_fetches_first_and_exits_3_on_a_bad_model(tmp_path, server, stack_factory):
    doc = yaml.safe_load(fetch_config(tmp_path, server, sha256="4" * 64).read_text())
    doc["rules"][0]["model"], doc["control"] = "shaped", {"listen": "CONTROL"}
    up = stack_factory(yaml.safe_dump(doc), ready=False)
    assert up.proc.wait(60) == 3, up.output()
    assert f"model 'shaped': checksum mismatch for {server.url('/group1/M00/trend.zip')}" in up.output()
    assert not (up.run_dir / "supervisord.conf").exists()  # nothing was started


# -------------------------------------------------------------------------------------------- workers

def message(payload: bytes, seq: int = 1) -> envelope.Message:
    return envelope.Message(f"b-{seq}", "r", "local", "in/d1", payload, 1, seq, 1, 0.0)


def test_a_worker_loads_the_resolved_version_and_reuses_it_offline(tmp_path, server, clean_imports):
    sha = digests(ARCHIVE)[0]
    served = {"url": server.serve("/m.zip", ARCHIVE), "sha256": sha, "insecure": True}  # plain http, checked
    cfg = parse({"m": served}, tmp_path, data_dir=str(tmp_path / "d"))
    proc = load(cfg, "r")
    assert proc.model.sha256 == sha and proc.model.folder == tmp_path / "d" / "models" / "m" / sha / "model" / "trend"
    result = proc(message(b'{"x": 1}'))
    assert result.kind == envelope.PUBLISH and b'"files":["index.py","weights.bin"]' in result.payload
    server.stop()
    assert load(cfg, "r").model.sha256 == sha
    gone = {"url": server.url("/other.zip"), "sha256": "2" * 64, "insecure": True}
    moved = parse({"m": gone}, tmp_path, data_dir=str(tmp_path / "d"))
    with pytest.raises(ModelLoadError, match=r"model 'm': download of http://127\.0\.0\.1:\d+/other\.zip failed"):
        load(moved, "r")


def test_the_filter_answers_refused_messages_with_nothing(tmp_path, clean_imports):
    flt = {"any": [{"path": ["deviceInfo", "deviceName"], "op": "==", "value": "d1"},
                   {"path": ["telemetry"], "op": "contains", "value": "temp"}]}
    models = {"m": {"path": str(HERE / "models" / "probe")}}
    cfg = config.parse({**BASE, "rules": [{**BASE["rules"][0], "filter": flt}], "models": models}, tmp_path / "p.yaml")
    rule = cfg.rule("r")
    loaded = model.load("m", HERE / "models" / "probe")
    proc = Processor(rule, loaded, model.Context("r", "m", {}, logging.getLogger("m")))
    payloads = [b'{"deviceInfo": {"deviceName": "d1"}, "seq": 1}', b'{"deviceInfo": {"deviceName": "d2"}, "seq": 2}',
                b'{"telemetry": {"temp": 3}, "seq": 3}', b'[1, 2]', b'not json']
    kinds = [proc(message(p, i)).kind for i, p in enumerate(payloads)]
    assert kinds == [envelope.PUBLISH, envelope.NOTHING, envelope.PUBLISH, envelope.NOTHING, envelope.ERROR]
    assert proc.filtered == 2
