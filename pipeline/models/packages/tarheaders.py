"""Checking a tar archive's headers before tarfile reads it.

tarfile reads the contents of GNU long-name / long-link ('L' / 'K') and pax ('x', 'g', 'X') headers into memory
whole, at whatever size they declare, before any caller sees a member. `check_headers` streams the archive
through its decompressor one 512-byte block at a time and refuses it before that happens: an extended header
larger than `EXTENDED_MAX` (counting the global pax headers still in force), a member declaring more than
`Limits.max_bytes`, more than `Limits.max_files` entries or more than `max_bytes` declared in all, and sparse
files. Headers are parsed by tarfile itself (TarInfo.frombuf, and a TarFile over the few header blocks of one
member so that pax values such as `size` apply); member contents are skipped, never held. At most one member's
extended headers (bounded) and one block are in memory at a time.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import tarfile
from pathlib import Path
from typing import BinaryIO

from pipeline.errors import ModelLoadError
from pipeline.models.packages.sources import Limits

EXTENDED_MAX = 1 << 20  # bytes of extended headers (long names, pax records) one member may carry
_BLOCK = tarfile.BLOCKSIZE
_EXTENDED = {tarfile.GNUTYPE_LONGNAME: "GNU long-name ('L')", tarfile.GNUTYPE_LONGLINK: "GNU long-link ('K')",
             tarfile.XHDTYPE: "pax ('x')", tarfile.XGLTYPE: "pax global ('g')",
             tarfile.SOLARIS_XHDTYPE: "pax ('X')"}
_MAGIC = ((b"\x1f\x8b", gzip.open), (b"BZh", bz2.open), (b"\xfd7zXZ\x00", lzma.open))  # tarfile's own choice


def check_headers(archive: Path, limits: Limits) -> None:
    """Raise ModelLoadError if `archive` is not a tar archive or its headers pass a limit; read nothing big."""
    with archive.open("rb") as raw:
        magic = raw.read(6)
    opener = next((o for m, o in _MAGIC if magic.startswith(m)), open)
    try:
        with opener(archive, "rb") as stream:
            _scan(stream, limits)
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise ModelLoadError(f"damaged archive: {e}") from None


def _scan(stream: BinaryIO, limits: Limits) -> None:
    glob, pending = bytearray(), bytearray()
    entries = declared = 0
    while (block := stream.read(_BLOCK)) and block.count(0) != _BLOCK:
        head = _header(block, first=not (entries or glob or pending))
        if head.type in _EXTENDED:
            data = _extended(stream, block, head, len(glob) + len(pending))
            (glob if head.type == tarfile.XGLTYPE else pending).extend(data)
            continue
        member, skip = _member(bytes(glob + pending + block))
        pending.clear()
        entries += 1
        declared += member.size if member.isreg() else 0
        if member.isreg() and member.size > limits.max_bytes:
            raise ModelLoadError(f"archive refused: {member.name!r} declares {member.size} bytes, more than "
                                 f"{limits.max_bytes} (max_bytes)")
        if entries > limits.max_files:
            raise ModelLoadError(f"archive refused: more than {limits.max_files} entries (max_files)")
        if declared > limits.max_bytes:
            raise ModelLoadError(f"archive refused: unpacks to more than {limits.max_bytes} bytes (max_bytes)")
        _skip(stream, skip)


def _header(block: bytes, first: bool) -> tarfile.TarInfo:
    try:
        return tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.HeaderError as e:
        raise ModelLoadError("not a zip or tar archive" if first else f"damaged archive: {e}") from None


def _extended(stream: BinaryIO, block: bytes, head: tarfile.TarInfo, held: int) -> bytes:
    """An extended header block with its contents, once its declared size is known to be small."""
    if held + head.size > EXTENDED_MAX:
        raise ModelLoadError(f"archive refused: a {_EXTENDED[head.type]} header declares {head.size} bytes (at "
                             f"most {EXTENDED_MAX} bytes of extended headers per member)")
    size = -(-head.size // _BLOCK) * _BLOCK
    data = stream.read(size)
    if len(data) != size:
        raise ModelLoadError(f"damaged archive: it ends inside a {_EXTENDED[head.type]} header")
    return block + data


def _member(headers: bytes) -> tuple[tarfile.TarInfo, int]:
    """The member these header blocks describe, as tarfile reads it, and how many bytes of content follow."""
    tar = tarfile.TarFile(fileobj=io.BytesIO(headers), mode="r")
    member = tar.firstmember
    if member is None:
        raise ModelLoadError("damaged archive: a header without a member")
    if member.issparse() or member.type == tarfile.GNUTYPE_SPARSE:
        raise ModelLoadError(f"archive refused: {member.name!r} is a sparse file")
    return member, tar.offset - len(headers)


def _skip(stream: BinaryIO, size: int) -> None:
    while size > 0:
        got = len(stream.read(min(size, 1 << 16)))
        if not got:
            raise ModelLoadError("damaged archive: it ends inside a member")
        size -= got
