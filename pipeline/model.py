"""Loading a model package and the `context` handed to it.

A model is a folder, or a .zip unpacked under the run directory, holding `index.py` with
`handler(event, context)` and optionally `init(context)`. The folder goes on sys.path (so `import helper`
works, and pickles that name helper modules load) and is also imported as a package (so
`from . import helper` works and `__file__` points into the folder).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import os
import re
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import digest
from pipeline.errors import ModelLoadError

if TYPE_CHECKING:
    import zipfile


@dataclass
class Context:
    """What a model sees besides the event. One object per worker, updated for each message."""

    rule: str
    model: str
    params: dict[str, Any]
    logger: logging.Logger
    topic: str | None = None
    received_at: float | None = None
    message_id: str | None = None
    attempt: int = 1
    extra: dict[str, Any] = field(default_factory=dict)  # free for the model's own use


@dataclass(frozen=True)
class LoadedModel:
    name: str
    folder: Path
    sha256: str
    handler: Callable[[Any, Context], Any]
    init: Callable[[Context], Any] | None


def sha256_of(path: Path) -> str:
    """Digest of a zip file, or of a folder's files (names and contents, in sorted order)."""
    h = digest.sha256()
    if path.is_file():
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    for p in sorted(path.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts:
            h.update(str(p.relative_to(path)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def unpack(archive: Path, into: Path) -> Path:
    """Unpack a zip once into `into/<sha256>/` (atomically); return the folder holding index.py."""
    import shutil  # here, not at the top: most workers load a folder (~0.5 MiB less each)
    import zipfile

    digest = sha256_of(archive)
    dest = into / digest
    if not dest.exists():
        tmp = into / f".{digest}.{os.getpid()}.tmp"  # workers of one rule may unpack at the same time
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            with zipfile.ZipFile(archive) as z:
                _check_members(z, archive)
                z.extractall(tmp)
        except zipfile.BadZipFile as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ModelLoadError(f"{archive}: not a valid zip file: {e}") from e
        try:
            tmp.rename(dest)
        except OSError:  # another worker won the race: its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    return _index_folder(dest, archive)


def _check_members(z: zipfile.ZipFile, archive: Path) -> None:
    for name in z.namelist():
        if name.startswith("/") or ".." in Path(name).parts:
            raise ModelLoadError(f"{archive}: refusing unsafe path in archive: {name!r}")


def _index_folder(folder: Path, source: Path) -> Path:
    if (folder / "index.py").is_file():
        return folder
    entries = [p for p in folder.iterdir() if p.name not in ("__MACOSX",)]
    if len(entries) == 1 and entries[0].is_dir() and (entries[0] / "index.py").is_file():
        return entries[0]  # one top-level folder, as the old runtime's zips have
    raise ModelLoadError(f"{source}: no index.py at the top of the model (nor inside a single top folder)")


class _Alias:
    """Makes `<package>.helper` the very module `helper`, so relative and absolute imports of a model's
    helper give one module (one class object: isinstance and unpickled objects agree). A meta path finder and
    loader by protocol (find_spec, create_module, exec_module): subclassing importlib.abc's would load
    importlib.resources, tempfile and shutil into every worker (~0.6 MiB)."""

    def __init__(self, package: str) -> None:
        self.prefix = package + "."

    def find_spec(self, fullname: str, path: object, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if fullname.startswith(self.prefix) and fullname != self.prefix + "index":
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return importlib.import_module(spec.name[len(self.prefix):])

    def exec_module(self, module: types.ModuleType) -> None:
        pass  # imported already, under its top-level name


def load(name: str, path: Path, cache_dir: Path) -> LoadedModel:
    """Import a model package; raise ModelLoadError naming the model and path on any failure."""
    if not path.exists():
        raise ModelLoadError(f"model '{name}': {path} does not exist")
    folder = unpack(path, cache_dir / name) if path.is_file() else _index_folder(path, path)
    package = "pipeline_model_" + re.sub(r"\W", "_", name)
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    pkg = types.ModuleType(package)
    pkg.__path__ = []  # submodules come from _Alias, never from a second import of the same file
    sys.modules[package] = pkg
    sys.meta_path.insert(0, _Alias(package))
    spec = importlib.util.spec_from_file_location(f"{package}.index", folder / "index.py")
    if spec is None or spec.loader is None:
        raise ModelLoadError(f"model '{name}': cannot import {folder / 'index.py'}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as e:  # a model may raise anything at import, SystemExit included
        raise ModelLoadError(f"model '{name}': importing {folder / 'index.py'} failed: {type(e).__name__}: {e}") from e
    handler = getattr(module, "handler", None)
    if not callable(handler):
        raise ModelLoadError(f"model '{name}': {folder / 'index.py'} defines no handler(event, context)")
    init = getattr(module, "init", None)
    return LoadedModel(name, folder, sha256_of(path), handler, init if callable(init) else None)


def run_init(model: LoadedModel, context: Context) -> None:
    if model.init is None:
        return
    try:
        model.init(context)
    except BaseException as e:
        raise ModelLoadError(f"model '{model.name}': init(context) failed: {type(e).__name__}: {e}") from e
