"""Loading a model package and the `context` handed to it.

A model is a folder holding `index.py` with `handler(event, context)` and optionally `init(context)`
(archives are verified and unpacked by `pipeline.models.packages` first). The folder goes on sys.path (so
`import helper` works, and pickles that name helper modules load) and is also imported as a package (so
`from . import helper` works and `__file__` points into the folder).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import re
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import digest
from pipeline.errors import ModelLoadError


@dataclass(frozen=True)
class Meta:
    """One message of a `handler_batch` call: `context.batch[i]` describes `events[i]`; in a keyed rule `key`
    is its key value and `state` its key's state (a batch holds each key at most once)."""

    topic: str
    received_at: float
    message_id: str
    attempt: int
    key: str | None = None
    state: dict[str, Any] | None = None


@dataclass
class Context:
    """What a model sees besides the event. One object per worker, updated for each call. In a `handler_batch`
    call `batch` describes its events; topic, received_at, message_id, key and state are None when they are
    several. In a keyed rule `key` is the message's key value and `state` its key's state: a dict the model reads
    and changes, committed with the message's result (discarded when the call raises)."""

    rule: str
    model: str
    params: dict[str, Any]
    logger: logging.Logger
    topic: str | None = None
    received_at: float | None = None
    message_id: str | None = None
    attempt: int = 1
    extra: dict[str, Any] = field(default_factory=dict)  # free for the model's own use
    batch: list[Meta] = field(default_factory=list)
    key: str | None = None
    state: dict[str, Any] | None = None


Handler = Callable[[Any, Context], Any]
BatchHandler = Callable[[list[Any], Context], Any]


@dataclass(frozen=True)
class LoadedModel:
    """A model folder imported: its handler(s), its `init` and the sha256 of its version."""

    name: str
    folder: Path
    sha256: str
    handler: Handler | None  # None: the model defines only handler_batch (then called with a batch of one)
    init: Callable[[Context], Any] | None
    handler_batch: BatchHandler | None = None


def sha256_of(folder: Path) -> str:
    """Digest of a folder's files (names and contents, in sorted order): the version of a model used in place."""
    h = digest.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts:
            h.update(str(p.relative_to(folder)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


class _Alias:
    """Makes `<package>.helper` the very module `helper`, so relative and absolute imports of a model's
    helper give one module (one class object: isinstance and unpickled objects agree). A meta path finder and
    loader by protocol (find_spec, create_module, exec_module): subclassing importlib.abc's would load
    importlib.resources, tempfile and shutil into every worker."""

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


_LOADED: dict[str, tuple[str, Path]] = {}  # model name -> (its package name, its folder), while imported


def load(name: str, folder: Path, version: str | None = None) -> LoadedModel:
    """Import the model in `folder` (holding index.py: a folder `packages.resolve` returned, where archives are
    verified and unpacked); raise ModelLoadError naming the model and path on any failure. `version`: its
    sha256 when known (`packages.version_of`), else the digest of the folder's files."""
    if not (folder / "index.py").is_file():
        raise ModelLoadError(f"model '{name}': no index.py in {folder}")
    package = "pipeline_model_" + re.sub(r"\W", "_", name)
    _LOADED[name] = (package, folder)
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
    handler, batch, init = (getattr(module, f, None) for f in ("handler", "handler_batch", "init"))
    handler, batch, init = (f if callable(f) else None for f in (handler, batch, init))
    if handler is None and batch is None:
        raise ModelLoadError(f"model '{name}': {folder / 'index.py'} defines no handler(event, context) "
                             "(nor handler_batch(events, context))")
    return LoadedModel(name, folder, version or sha256_of(folder), handler, init, batch)


def unload(name: str) -> None:
    """Undo what `load` did to the interpreter for the model `name`: its folder on sys.path, its import alias,
    and every module imported from its folder or under its package name. A worker never needs it (one model for
    the life of the process); a process that loads a model again from a fresh state does."""
    package, folder = _LOADED.pop(name, (None, None))
    if package is None or folder is None:
        return
    while str(folder) in sys.path:
        sys.path.remove(str(folder))
    sys.meta_path[:] = [f for f in sys.meta_path if not (isinstance(f, _Alias) and f.prefix == package + ".")]
    root = str(folder) + "/"
    for mod_name, module in list(sys.modules.items()):
        where = [str(getattr(module, "__file__", None) or ""), *(getattr(module, "__path__", None) or [])]
        if mod_name == package or mod_name.startswith(package + ".") or any(str(w).startswith(root) for w in where):
            del sys.modules[mod_name]


def loaded() -> list[str]:
    """The names of the models `load` imported and `unload` did not undo."""
    return list(_LOADED)


def check_batch(values: Any, n: int) -> list[Any]:
    """What handler_batch returned for n events (a list, tuple or numpy array, one item per event) as a list;
    ValueError when it is not n items."""
    sized = hasattr(values, "__len__") and not isinstance(values, (str, bytes, bytearray, dict))
    if not sized or len(values) != n:
        got = f"{len(values)} results" if sized else f"a {type(values).__name__}"
        raise ValueError(f"handler_batch returned {got} for {n} event(s): expected a list of {n}")
    return list(values)


def run_init(model: LoadedModel, context: Context) -> None:
    if model.init is None:
        return
    try:
        model.init(context)
    except BaseException as e:
        raise ModelLoadError(f"model '{model.name}': init(context) failed: {type(e).__name__}: {e}") from e
