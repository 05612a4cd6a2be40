"""Unpacking zip and tar archives without trusting them.

Refused: absolute paths (and drive letters), `..` components, any symlink in a zip, tar symlinks and hard
links that resolve outside the unpacked tree (checked when created, before every write, and once more at the
end, so a chain of links cannot escape), device files and fifos, duplicate entries, and archives that pass
`Limits.max_files` entries or `Limits.max_bytes` unpacked bytes. Sizes are checked twice: the declared ones
before writing anything (zip) or as entries arrive (tar), and the bytes actually written, since headers can
lie. A tar archive's headers are checked first (pipeline.models.packages.tarheaders), so that tarfile never reads a
header of a size the limits refuse. Nothing is written outside `dest`; the caller removes `dest` when this
raises. What is unpacked is private to the user: folders 0700, files 0600 (0700 when executable), whatever
the umask."""

from __future__ import annotations

import os
import re
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from pipeline.errors import ModelLoadError
from pipeline.models.packages.sources import Limits
from pipeline.models.packages.tarheaders import check_headers


class _Budget:
    """What unpacking one archive may still write (bytes, files)."""

    def __init__(self, limits: Limits) -> None:
        self.limits, self.entries, self.declared, self.written = limits, 0, 0, 0

    def entry(self, declared_size: int) -> None:
        self.entries += 1
        self.declared += max(declared_size, 0)
        if self.entries > self.limits.max_files:
            raise ModelLoadError(f"archive refused: more than {self.limits.max_files} entries (max_files)")
        if self.declared > self.limits.max_bytes:
            raise ModelLoadError(f"archive refused: unpacks to more than {self.limits.max_bytes} bytes (max_bytes)")

    def copy(self, src: BinaryIO, target: Path, mode: int = 0) -> None:
        """Copy a member's content, counting the bytes; 0700 when `mode` is executable, else 0600."""
        with open(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
            os.fchmod(out.fileno(), 0o700 if mode & 0o111 else 0o600)
            while chunk := src.read(1 << 16):
                self.written += len(chunk)
                if self.written > self.limits.max_bytes:
                    raise ModelLoadError(
                        f"archive refused: unpacks to more than {self.limits.max_bytes} bytes (max_bytes), "
                        "more than its headers declare")
                out.write(chunk)


def unpack(archive: Path, dest: Path, limits: Limits) -> None:
    """Unpack a zip or tar (plain, gz, bz2, xz) archive into the new folder `dest`."""
    private_dir(dest)
    budget = _Budget(limits)
    try:
        if zipfile.is_zipfile(archive):
            _unzip(archive, dest, budget)
        else:
            check_headers(archive, limits)  # before tarfile reads any of it
            _untar(archive, dest, budget)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, tarfile.TarError, zlib.error, EOFError) as e:
        raise ModelLoadError(f"damaged archive: {e}") from None
    except (NotImplementedError, RuntimeError) as e:  # unsupported compression, encrypted zip
        raise ModelLoadError(f"cannot unpack the archive: {e}") from None
    except OSError as e:
        where = str(e.filename or "").removeprefix(f"{dest}{os.sep}")
        raise ModelLoadError(f"cannot unpack the archive: {e.strerror or e} ({where})") from None


def _relative(name: str) -> PurePosixPath | None:
    """A member name as a safe relative path; None for the archive root itself ('./')."""
    text = name.replace("\\", "/")
    if "\0" in text or text.startswith("/") or re.match(r"[A-Za-z]:", text):
        raise ModelLoadError(f"archive refused: absolute path {name!r}")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ModelLoadError(f"archive refused: path with a '..' component {name!r}")
    return PurePosixPath(*parts) if parts else None


def _inside(path: str | Path, root: Path) -> bool:
    real = os.path.realpath(path)
    return real == str(root) or real.startswith(str(root) + os.sep)


def _target(dest: Path, rel: PurePosixPath, name: str) -> Path:
    """Where a member goes, after checking that no link on the way leads out of `dest`."""
    target = dest.joinpath(*rel.parts)
    if not _inside(target.parent, Path(os.path.realpath(dest))):
        raise ModelLoadError(f"archive refused: {name!r} would be written through a link leading outside")
    for folder in [dest.joinpath(*rel.parts[:i]) for i in range(1, len(rel.parts))]:
        if not folder.is_dir():
            private_dir(folder)
    return target


def private_dir(path: Path) -> None:
    """Create the folder `path` (its parent exists) for the user only, whatever the umask; keep one that exists."""
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        if not path.is_dir():
            raise
        return
    path.chmod(0o700)


def _unzip(archive: Path, dest: Path, budget: _Budget) -> None:
    with zipfile.ZipFile(archive) as z:
        members = z.infolist()
        for info in members:  # every declared size and the count, before anything is written
            budget.entry(info.file_size)
        for info in members:
            rel = _relative(info.filename)
            kind = stat.S_IFMT(info.external_attr >> 16)
            if kind == stat.S_IFLNK:
                raise ModelLoadError(f"archive refused: symbolic link {info.filename!r} (zips may not hold links)")
            if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise ModelLoadError(f"archive refused: {info.filename!r} is a device file or fifo")
            if rel is None:
                continue
            target = _target(dest, rel, info.filename)
            if info.is_dir() or kind == stat.S_IFDIR:
                private_dir(target)
                continue
            with z.open(info) as src:
                budget.copy(src, target, info.external_attr >> 16)


def _untar(archive: Path, dest: Path, budget: _Budget) -> None:
    root = Path(os.path.realpath(dest))
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:  # streamed: limits apply before the whole index is read
            budget.entry(member.size if member.isreg() else 0)
            _tar_member(tar, member, dest, root, budget)
    for path in dest.rglob("*"):  # a later link may have re-pointed an earlier one
        if path.is_symlink() and not _inside(path, root):
            raise ModelLoadError(f"archive refused: link {path.relative_to(dest)} resolves outside the archive")


def _tar_member(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path, root: Path, budget: _Budget) -> None:
    rel = _relative(member.name)
    if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
        raise ModelLoadError(f"archive refused: {member.name!r} is a device file, fifo or other special file")
    if rel is None:
        return
    target = _target(dest, rel, member.name)
    if member.isdir():
        private_dir(target)
    elif member.issym():
        _symlink(member, target, root)
    elif member.islnk():
        _hardlink(member, dest, target, root, budget)
    else:
        src = tar.extractfile(member)
        assert src is not None  # a regular file always has content
        budget.copy(src, target, member.mode)


def _symlink(member: tarfile.TarInfo, target: Path, root: Path) -> None:
    escape = ModelLoadError(f"archive refused: link {member.name!r} -> {member.linkname!r} points outside")
    if member.linkname.startswith("/") or not member.linkname:
        raise escape
    os.symlink(member.linkname, target)
    if not _inside(target, root):
        raise escape


def _hardlink(member: tarfile.TarInfo, dest: Path, target: Path, root: Path, budget: _Budget) -> None:
    """A hard link is unpacked as a copy of the file it names (counted against max_bytes)."""
    rel = _relative(member.linkname)
    source = dest.joinpath(*rel.parts) if rel else dest
    if not _inside(source, root) or not source.is_file():
        raise ModelLoadError(
            f"archive refused: hard link {member.name!r} -> {member.linkname!r} points outside or to no file")
    with open(source, "rb") as src:
        budget.copy(src, target, source.stat().st_mode)


def model_root(folder: Path) -> Path:
    """The folder holding index.py: `folder`, or its single top folder (ignoring __MACOSX and dot files)."""
    if (folder / "index.py").is_file():
        return folder
    entries = [p for p in folder.iterdir() if p.name != "__MACOSX" and not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir() and (entries[0] / "index.py").is_file():
        return entries[0]
    raise ModelLoadError("no index.py at the top of the model (or inside its single top folder)")

