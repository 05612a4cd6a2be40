"""Loading model packages: folders, zips (flat or with one top folder) unpacked by `pipeline.models.packages` as a
worker's are, and every way loading can fail."""

from __future__ import annotations

import hashlib
import logging
import re
import sys
import zipfile
from pathlib import Path

import pytest

from pipeline.errors import ModelLoadError
from pipeline.models import loader as model
from pipeline.models.packages import ModelSource, resolve

MODELS = Path(__file__).parent / "models"
ECHO = "def handler(event, context):\n    return event\n"
LAYOUTS = ["folder", "flat", "top-folder", "top-folder+__MACOSX"]


@pytest.fixture(autouse=True)
def isolated_imports():
    """model.load edits sys.path and sys.modules: undo it, so each test imports its models afresh."""
    yield
    for name in model.loaded():
        model.unload(name)


def ctx(name: str, **params: object) -> model.Context:
    return model.Context("rule-x", name, dict(params), logging.getLogger(f"model.{name}"), topic="in/d1/data",
                         received_at=1700000000.5, message_id="boot-1")


def load(name: str, path: Path, tmp_path: Path) -> model.LoadedModel:
    """As a worker loads a model: its source resolved (an archive verified and unpacked into the data dir's
    cache), then the folder imported."""
    return model.load(name, resolve(name, ModelSource(path=path), tmp_path / "data"))


def make_zip(path: Path, members: dict[str, bytes | str]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)  # writestr keeps names as given ('/abs', '../x'), unlike write()
    return path


def withinit(tmp_path: Path, layout: str) -> Path:
    """tests/models/withinit as a folder, a flat zip, or a zip with one top folder (+ __MACOSX)."""
    if layout == "folder":
        return MODELS / "withinit"
    prefix = "" if layout == "flat" else "withinit/"
    files = sorted(p for p in (MODELS / "withinit").iterdir() if p.is_file())
    members = {prefix + p.name: p.read_bytes() for p in files}
    if layout.endswith("__MACOSX"):
        members["__MACOSX/withinit/._index.py"] = b"\x00\x05"
    return make_zip(tmp_path / "withinit.zip", members)


def test_folder_model_handler_sees_context(tmp_path):
    loaded = load("probe_folder", MODELS / "probe", tmp_path)
    assert loaded.folder == MODELS / "probe" and loaded.init is None
    assert loaded.sha256 == model.sha256_of(MODELS / "probe") and len(loaded.sha256) == 64
    out = loaded.handler({"seq": 7}, ctx("probe_folder", tag="t1"))
    assert (out["seq"], out["tag"], out["topic"], out["rule"], out["model"], out["message_id"]) == \
        (7, "t1", "in/d1/data", "rule-x", "probe_folder", "boot-1")
    assert out["received_at"] == 1700000000.5 and loaded.handler({"skip": True}, ctx("probe_folder")) is None
    with pytest.raises(ValueError, match="asked to fail on 3"):
        loaded.handler({"fail": True, "seq": 3}, ctx("probe_folder"))
    assert not (tmp_path / "data").exists()  # folders are used in place


@pytest.mark.parametrize("layout", LAYOUTS)
def test_withinit_init_and_handler(tmp_path, layout):
    name = "withinit_" + re.sub(r"\W", "_", layout)
    loaded = load(name, withinit(tmp_path, layout), tmp_path)
    assert loaded.init is not None
    model.run_init(loaded, ctx(name))
    # scaler.pkl holds helper_scaler.Scaler(factor=2, offset=273); units.txt holds "kelvin"
    assert loaded.handler({"value": 0}, ctx(name)) == {"value": 273, "unit": "kelvin", "inits": 1}
    assert loaded.handler({"value": 1}, ctx(name))["value"] == 275


def test_helper_imported_once(tmp_path):
    model.load("helpers_once", MODELS / "withinit")
    index = sys.modules["pipeline_model_helpers_once.index"]
    assert index.relative.__file__ == sys.modules["helper_scaler"].__file__  # same file...
    assert index.relative is sys.modules["helper_scaler"]  # ...so it must be the same module


@pytest.mark.parametrize("layout", LAYOUTS[1:])
def test_zip_model_unpacked_once_into_cache(tmp_path, layout):
    archive = withinit(tmp_path, layout)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    name = "zip_" + re.sub(r"\W", "_", layout)
    loaded = load(name, archive, tmp_path)
    dest = tmp_path / "data" / "models" / name / digest / "model"
    assert loaded.folder == (dest if layout == "flat" else dest / "withinit")
    for f in ("index.py", "helper_scaler.py", "scaler.pkl", "units.txt"):
        assert (loaded.folder / f).read_bytes() == (MODELS / "withinit" / f).read_bytes()
    assert [p.name for p in (tmp_path / "data" / "models" / name).iterdir()] == [digest]  # no temporary left
    assert callable(loaded.handler) and callable(loaded.init)

    index = loaded.folder / "index.py"
    mtime = index.stat().st_mtime_ns
    (loaded.folder / "marker").write_text("left by the test")
    again = load(name, archive, tmp_path)
    assert again.folder == loaded.folder
    assert (loaded.folder / "marker").exists() and index.stat().st_mtime_ns == mtime  # reused as is


@pytest.mark.parametrize("prefix", ["", "probe/"])
def test_zip_model_works_and_new_zip_gets_new_folder(tmp_path, prefix):
    source = (MODELS / "probe" / "index.py").read_bytes()
    first = load("probe_zip", make_zip(tmp_path / "a.zip", {prefix + "index.py": source}), tmp_path)
    out = first.handler({"seq": 5}, ctx("probe_zip", tag="z"))
    assert (out["seq"], out["tag"], out["model"]) == (5, "z", "probe_zip")
    changed = make_zip(tmp_path / "a.zip", {prefix + "index.py": ECHO.replace("event\n", "[event]\n")})
    second = load("probe_zip", changed, tmp_path)
    assert second.folder != first.folder and second.handler(1, None) == [1]
    assert first.sha256 != second.sha256


@pytest.mark.parametrize("members, expected", [
    ({"readme.txt": "no model here"}, "no index.py at the top of the model"),
    ({"a/index.py": ECHO, "b/index.py": ECHO}, "no index.py at the top of the model"),
    ({"top/sub/index.py": ECHO}, "no index.py at the top of the model"),
    (None, "not a zip or tar archive"),
], ids=["no-index", "two-top-folders", "too-deep", "not-a-zip"])
def test_zip_without_index_is_refused(tmp_path, members, expected):
    archive = tmp_path / "noindex.zip"
    archive.write_bytes(b"PK but not a zip") if members is None else make_zip(archive, members)
    with pytest.raises(ModelLoadError, match=re.escape(f"model 'noindex_zip': {archive}: {expected}")):
        load("noindex_zip", archive, tmp_path)
    assert not list((tmp_path / "data").rglob("*.py"))


def test_a_folder_without_index_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=re.escape(f"model 'empty': no index.py in {tmp_path / 'empty'}")):
        model.load("empty", tmp_path / "empty")


def test_broken_model_names_the_missing_module(tmp_path):
    with pytest.raises(ModelLoadError) as e:
        model.load("broken_folder", MODELS / "broken")
    assert str(e.value) == (f"model 'broken_folder': importing {MODELS / 'broken' / 'index.py'} failed: "
                            "ModuleNotFoundError: No module named 'this_module_does_not_exist'")


@pytest.mark.parametrize("source, expected", [
    (ECHO + "def init(c):\n    raise RuntimeError('no weights')\n", "failed: RuntimeError: no weights"),
    (ECHO + "def init(c):\n    raise SystemExit(9)\n", "failed: SystemExit: 9"),
])
def test_init_that_raises(tmp_path, source, expected):
    (tmp_path / "badinit").mkdir()
    (tmp_path / "badinit" / "index.py").write_text(source)
    loaded = model.load("badinit", tmp_path / "badinit")
    with pytest.raises(ModelLoadError, match=re.escape(f"model 'badinit': init(context) {expected}")):
        model.run_init(loaded, ctx("badinit"))


@pytest.mark.parametrize("source, expected", [
    ("def predict(e, c):\n    return e\n", "index.py defines no handler(event, context)"),
    ("handler = 42\n", "index.py defines no handler(event, context)"),
    ("raise SystemExit(3)\n", "index.py failed: SystemExit: 3"),
    ("def handler(e, c)\n    return e\n", "index.py failed: SyntaxError: expected ':' (index.py, line 1)"),
])
def test_bad_index(tmp_path, source, expected):
    (tmp_path / "badindex").mkdir()
    (tmp_path / "badindex" / "index.py").write_text(source)
    with pytest.raises(ModelLoadError) as e:
        model.load("badindex", tmp_path / "badindex")
    assert str(e.value).startswith("model 'badindex': ") and f"{tmp_path}/badindex/{expected}" in str(e.value)
