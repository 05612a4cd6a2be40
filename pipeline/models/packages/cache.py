"""Resolving a model source to the folder holding index.py, through a content-addressed cache.

    <data dir>/models/<name>/<sha256 of the archive>/.source.json   where it came from, its digests, when
    <data dir>/models/<name>/<sha256 of the archive>/model/         the unpacked archive

A version is installed atomically: downloaded to a temporary file next to it, checked against the expected
digests, unpacked into a temporary folder, checked for safety and for index.py, then renamed into place; a
folder with `.source.json` is therefore complete and verified, and is reused without network when it matches
what the source expects: the sha256 and/or md5 when given, otherwise the same url (or the same archive for a
local path). The unpacked files sit in `model/`, apart from `.source.json`, because old models list their own
folder to find their files. Everything this module creates is the user's only: folders 0700, files 0600,
whatever the umask; a refusal leaves no temporary file or folder behind."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.errors import ModelLoadError
from pipeline.models.loader import sha256_of
from pipeline.models.packages.archive import model_root, private_dir, unpack
from pipeline.models.packages.sources import (
    Limits,
    ModelSource,
    check_integrity,
    choose_url,
    expected,
    md5_text,
    redact,
)

RECORD = ".source.json"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
DEFAULT_LIMITS = Limits()
_STALE = 3600.0  # seconds after which a temporary file or folder left by a killed process is removed


def resolve(name: str, source: ModelSource, data_dir: Path, limits: Limits = DEFAULT_LIMITS,
            progress: bool = False) -> Path:
    """The folder holding the model's index.py; raise ModelLoadError naming the model (and url) on failure."""
    try:
        if not _NAME.fullmatch(name):
            raise ModelLoadError("a model name is 1-63 letters, digits, '_', '.' or '-'")
        if source.path is not None:
            return _from_path(name, source, data_dir, limits)
        return _from_url(name, source, data_dir, limits, progress)
    except ModelLoadError as e:
        raise ModelLoadError(f"model '{name}': {e}") from e
    except OSError as e:
        raise ModelLoadError(f"model '{name}': {e.strerror or e} ({e.filename})") from e


def fetch_all(models: dict[str, ModelSource], data_dir: Path, limits: Limits = DEFAULT_LIMITS,
              progress: bool = False) -> dict[str, Path | ModelLoadError]:
    """Resolve every model (downloading what is missing); a failure is returned in place of its folder."""
    out: dict[str, Path | ModelLoadError] = {}
    for name, source in models.items():
        try:
            out[name] = resolve(name, source, data_dir, limits, progress)
        except ModelLoadError as e:
            out[name] = e
    return out


def source_info(folder: Path) -> dict[str, Any] | None:
    """What `.source.json` says about a folder `resolve` returned (url or path, sha256, md5, fetched_at);
    None for a folder used in place."""
    for candidate in (folder, *list(folder.parents)[:2]):
        record = candidate / RECORD
        if record.is_file():
            return _read(record)
    return None


def version_of(folder: Path) -> str:
    """A model version as workers report it: the sha256 of the archive it came from (recorded when it was
    unpacked), else the digest of a folder's files (which reads them all)."""
    info = source_info(folder)
    return str(info["sha256"]) if info and info.get("sha256") else sha256_of(folder)


def _from_path(name: str, source: ModelSource, data_dir: Path, limits: Limits) -> Path:
    path = source.path
    assert path is not None
    if path.is_dir():
        try:
            return model_root(path)
        except ModelLoadError as e:
            raise ModelLoadError(f"{path}: {e}") from None
    if not path.is_file():
        raise ModelLoadError(f"no such file or folder: {path}")
    sha, md5 = _digests(path)
    _verify(source, sha, md5, str(path))
    return _install(path, data_dir / "models" / name, {"path": str(path), "sha256": sha, "md5": md5}, limits)


def _from_url(name: str, source: ModelSource, data_dir: Path, limits: Limits, progress: bool) -> Path:
    url = choose_url(source)
    check_integrity(source, url)
    shown = redact(url)
    folder = data_dir / "models" / name
    cached = _cached(folder, source, shown)
    if cached is not None:
        return model_root(cached / "model")
    _private_folder(folder)
    _sweep(folder)
    from pipeline.models.packages.download import download  # urllib.request, http.client: only to download

    archive = download(url, folder, limits, progress)
    try:
        sha, md5 = _digests(archive)
        _verify(source, sha, md5, shown)
        return _install(archive, folder, {"url": shown, "sha256": sha, "md5": md5}, limits, shown)
    finally:
        archive.unlink(missing_ok=True)


def _digests(path: Path) -> tuple[str, str]:
    import hashlib  # here, not at the top: a worker that only reads the cache never loads OpenSSL (pipeline.digest)

    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)  # one pass over the archive for both
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
            md5.update(chunk)
    return sha.hexdigest(), md5.hexdigest()


def _verify(source: ModelSource, sha: str, md5: str, where: str) -> None:
    want_sha, want_md5 = expected(source)
    if want_sha and want_sha != sha:
        raise ModelLoadError(f"checksum mismatch for {where}: expected sha256 {want_sha}, got {sha}")
    if want_md5 and want_md5 != md5:
        given = source.md5 if isinstance(source.md5, str) else None
        raise ModelLoadError(f"checksum mismatch for {where}: expected md5 {md5_text(want_md5, given)}, "
                             f"got {md5_text(md5, given)}")


def _cached(folder: Path, source: ModelSource, url: str) -> Path | None:
    """The newest installed version matching every expected digest (or, with none given, the url)."""
    want_sha, want_md5 = expected(source)
    best: tuple[float, Path] | None = None
    for record in folder.glob(f"*/{RECORD}"):
        info = _read(record)
        if info is None or (want_sha and info.get("sha256") != want_sha) or (want_md5 and info.get("md5") != want_md5):
            continue
        if not (want_sha or want_md5) and info.get("url") != url:
            continue
        when = float(info.get("fetched_at") or 0)
        if best is None or when > best[0]:
            best = (when, record.parent)
    return best[1] if best else None


def _install(archive: Path, folder: Path, record: dict[str, Any], limits: Limits, shown: str = "") -> Path:
    final = folder / record["sha256"]
    if (final / RECORD).is_file():
        return model_root(final / "model")
    _private_folder(folder)
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".unpack-"))
    try:
        tmp.chmod(0o700)
        unpack(archive, tmp / "model", limits)
        model_root(tmp / "model")  # refuse an archive without index.py before it is installed
        _write_private(tmp / RECORD, json.dumps({**record, "fetched_at": time.time()}, indent=1) + "\n")
        try:
            tmp.rename(final)
        except OSError:
            if not (final / RECORD).is_file():  # not someone else's identical install: a real failure
                raise
    except ModelLoadError as e:
        raise ModelLoadError(f"{shown or archive}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model_root(final / "model")


def _private_folder(folder: Path) -> None:
    """`<data dir>/models/<name>`, its two levels created for the user only (the data dir as the umask says)."""
    folder.parent.parent.mkdir(parents=True, exist_ok=True)
    private_dir(folder.parent)
    private_dir(folder)


def _write_private(path: Path, text: str) -> None:
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8") as out:
        os.fchmod(out.fileno(), 0o600)
        out.write(text)


def _read(record: Path) -> dict[str, Any] | None:
    try:
        info = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _sweep(folder: Path) -> None:
    """Remove temporary files and folders that a killed process left behind (older than an hour)."""
    for path in [*folder.glob(".unpack-*"), *folder.glob(".download-*")]:
        try:
            if time.time() - path.lstat().st_mtime > _STALE:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        except OSError:
            pass
