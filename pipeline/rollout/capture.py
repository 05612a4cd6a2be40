"""The capture file: the messages one rule received, as a msgpack stream.

    header   {"format": "pipeline-capture", "version": 1, "rule", "model", "created_at", "source", "sub"}
    record   [topic (str), payload (bin), time (float, unix), qos (0 or 1)]   one per message, in arrival order

A capture file is data from outside: `read` trusts nothing in it. A record (the header included) is at most
MAX_RECORD bytes; a file that ends inside a record, holds something that is not a record, or has a header of
another format or version is refused with `CaptureError`, which names the file and the byte offset of the
record at fault. `Writer` writes to a fresh hidden name (O_EXCL|O_NOFOLLOW, 0600) and renames it into place
only when finished, so a capture at its final name is always whole.
"""

from __future__ import annotations

import math
import os
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, NamedTuple

import msgpack

from pipeline.errors import CONFIG_ERROR, PipelineError

FORMAT = "pipeline-capture"
VERSION = 1
MAX_RECORD = 32 << 20  # bytes of one record, payload included; a larger one is refused when read, never written
READ_CHUNK = 1 << 16
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")  # a rule's or model's name, as the config allows them


class CaptureError(PipelineError):
    """A capture file that cannot be used: the message names the file and the offset."""

    exit_code = CONFIG_ERROR


class Record(NamedTuple):
    """One message as the rule received it."""

    topic: str
    payload: bytes
    time: float  # unix time of its arrival
    qos: int


def header(rule: str, model: str, source: str, sub: str) -> dict[str, Any]:
    """The first record of a capture of `rule` (whose model was `model` and filter `sub`), taken by `source`
    ("tap": a running stack's ingress; "broker": a subscription of its own)."""
    return {"format": FORMAT, "version": VERSION, "rule": rule, "model": model, "created_at": time.time(),
            "source": source, "sub": sub}


def pack(record: Record) -> bytes:
    """A record as its bytes in the file."""
    return msgpack.packb(tuple(record), use_bin_type=True)


class Writer:
    """Writes a capture to `path`: records go to a hidden name beside it, renamed to `path` by `finish`."""

    def __init__(self, path: Path, head: dict[str, Any]) -> None:
        self.path, self.part = path, path.with_name(f".{path.name}.{secrets.token_hex(6)}.part")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        self.file: IO[bytes] = os.fdopen(os.open(self.part, flags, 0o600), "wb", buffering=1 << 16)
        self.bytes = 0
        self.write(msgpack.packb(head, use_bin_type=True))

    def write(self, packed: bytes) -> None:
        self.file.write(packed)
        self.bytes += len(packed)

    def finish(self) -> Path:
        """Flush, sync and move the capture to its name; return it."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.part, self.path)
        return self.path

    def discard(self) -> None:
        self.file.close()
        self.part.unlink(missing_ok=True)


def read(path: Path) -> tuple[dict[str, Any], Iterator[Record]]:
    """The header of the capture at `path` and an iterator over its records; CaptureError (when the header is
    read, or later while iterating) naming the file and offset of what is wrong."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed by the iterator, or below on a bad header
        size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise CaptureError(f"{path}: cannot read it: {e.strerror}") from None
    unpacker = msgpack.Unpacker(f, read_size=READ_CHUNK, max_buffer_size=MAX_RECORD, raw=False, use_list=True,
                                strict_map_key=True)
    try:
        head = _check_header(path, _first(path, unpacker, size))
    except CaptureError:
        f.close()
        raise
    return head, _records(path, f, unpacker, size)


def _next(path: Path, unpacker: msgpack.Unpacker, size: int) -> Any:
    """The next object of the stream; StopIteration at a clean end; CaptureError on anything else."""
    offset = unpacker.tell()
    try:
        return unpacker.unpack()
    except msgpack.OutOfData:
        if offset >= size:
            raise StopIteration from None
        raise CaptureError(f"{path}: truncated: the record at offset {offset} ends past the end of the file "
                           f"({size} bytes)") from None
    except msgpack.BufferFull:
        raise CaptureError(f"{path}: the record at offset {offset} is over {MAX_RECORD} bytes") from None
    except (ValueError, TypeError, msgpack.UnpackException) as e:  # FormatError, StackError, ExtraData...
        why = f"{type(e).__name__}: {e}" if str(e) else "not msgpack"
        raise CaptureError(f"{path}: not a capture record at offset {offset}: {why}") from None


def _first(path: Path, unpacker: msgpack.Unpacker, size: int) -> Any:
    try:
        return _next(path, unpacker, size)
    except StopIteration:
        raise CaptureError(f"{path}: not a capture file (offset 0: the file is empty)") from None
    except CaptureError as e:
        raise CaptureError(f"{path}: not a capture file (offset 0: {e.args[0].removeprefix(f'{path}: ')})") from None


def _check_header(path: Path, head: Any) -> dict[str, Any]:
    if not isinstance(head, dict) or head.get("format") != FORMAT:
        raise CaptureError(f"{path}: not a capture file (offset 0: no '{FORMAT}' header)")
    if head.get("version") != VERSION:
        raise CaptureError(f"{path}: capture format version {head.get('version')!r:.40} at offset 0; this "
                           f"pipeline reads version {VERSION}")
    for field in ("rule", "model"):
        if not isinstance(head.get(field), str) or not NAME.fullmatch(head[field]):
            raise CaptureError(f"{path}: the header at offset 0 has no '{field}' name (1-63 letters, digits, "
                               f"'_', '.' or '-')")
    return head


def _records(path: Path, f: IO[bytes], unpacker: msgpack.Unpacker, size: int) -> Iterator[Record]:
    try:
        while True:
            offset = unpacker.tell()
            try:
                item = _next(path, unpacker, size)
            except StopIteration:
                return
            yield _record(path, offset, item)
    finally:
        f.close()


def _record(path: Path, offset: int, item: Any) -> Record:
    if not (isinstance(item, list) and len(item) == 4 and isinstance(item[0], str) and isinstance(item[1], bytes)
            and type(item[2]) in (int, float) and math.isfinite(item[2]) and type(item[3]) is int
            and item[3] in (0, 1)):
        raise CaptureError(f"{path}: not a capture record at offset {offset}: expected [topic, payload, time, qos] "
                           "(a string, bytes, a finite number, 0 or 1)")
    return Record(*item)


def read_all(path: Path) -> tuple[dict[str, Any], list[Record]]:
    """The header and every record of the capture at `path` (CaptureError as `read`)."""
    head, records = read(path)
    return head, list(records)
