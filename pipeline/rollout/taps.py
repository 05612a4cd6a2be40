"""A recording asked of a running stack: the files control and ingress exchange in the run directory.

Control writes `taps/<rule>.json` (a `Request`: its id and bounds) to start a recording and removes it to stop
one; ingress's tap writes `taps/<rule>.status.json` (a `Status`) while it records and when it ends, and removes
the request it ended by itself (a bound reached). Every file is written whole (`run_dir.write_private`). The
bounds are always set: count, bytes and seconds each have a default and a ceiling, so a forgotten recording
ends by itself and cannot fill the disk.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.supervision import run_dir as rundir

DEFAULT_COUNT, MAX_COUNT = 100_000, 1_000_000  # messages kept
DEFAULT_BYTES, MAX_BYTES = 64 << 20, 1 << 30  # bytes of the capture file
DEFAULT_SECONDS, MAX_SECONDS = 600.0, 86_400.0  # how long it records
REQUEST_ID = re.compile(r"[A-Za-z0-9]{1,32}")  # part of the capture's file name: no path, no dot


@dataclass(frozen=True)
class Request:
    """A recording of `rule` asked for, with its bounds (each within its ceiling)."""

    rule: str
    id: str = field(default_factory=lambda: secrets.token_hex(4))
    count: int = DEFAULT_COUNT
    bytes: int = DEFAULT_BYTES
    seconds: float = DEFAULT_SECONDS

    def problem(self) -> str | None:
        """Why these bounds (or this id, which names the capture file) are refused, or None."""
        if not REQUEST_ID.fullmatch(self.id):
            return f"id must be 1-32 letters or digits (got {self.id!r:.40})"
        for name, value, ceiling in (("count", self.count, MAX_COUNT), ("bytes", self.bytes, MAX_BYTES),
                                     ("seconds", self.seconds, MAX_SECONDS)):
            if not 0 < value <= ceiling:
                return f"{name} must be over 0 and at most {ceiling:g} (got {value:g})"
        return None


@dataclass
class Status:
    """What a tap says of a recording: `state` "recording" or "done"; `reason` why it ended ("stopped": asked to,
    "count", "bytes", "seconds": a bound reached, "ingress restarted", "error: ..."); `kept` messages written,
    `missed` messages the tap could not keep without slowing ingress (its writer behind), `path` the capture."""

    id: str
    rule: str
    state: str = "recording"
    reason: str = ""
    kept: int = 0
    missed: int = 0
    bytes: int = 0
    path: str = ""
    started_at: float = 0.0
    ended_at: float | None = None
    bounds: dict[str, float] = field(default_factory=dict)


def ask(run_dir: Path, request: Request) -> None:
    """Write the request for ingress."""
    path = rundir.tap_request(run_dir, request.rule)
    rundir.private_folder(path.parent)
    rundir.write_private(path, json.dumps(asdict(request)))


def asked(run_dir: Path, rule: str) -> Request | None:
    """The request for `rule`, None when there is none or it is unreadable."""
    doc = _read(rundir.tap_request(run_dir, rule))
    try:
        return Request(rule, str(doc["id"]), int(doc["count"]), int(doc["bytes"]), float(doc["seconds"]))
    except (KeyError, TypeError, ValueError, OverflowError):  # OverflowError: int() of an infinite number
        return None


def withdraw(run_dir: Path, rule: str, request_id: str | None = None) -> bool:
    """Remove the request for `rule` (only when it is `request_id`, if given); True when one was removed."""
    path = rundir.tap_request(run_dir, rule)
    current = asked(run_dir, rule)
    if current is None or (request_id is not None and current.id != request_id):
        return False
    path.unlink(missing_ok=True)
    return True


def report(run_dir: Path, status: Status) -> None:
    """Write the tap's status of a recording."""
    path = rundir.tap_status(run_dir, status.rule)
    rundir.private_folder(path.parent)
    rundir.write_private(path, json.dumps(asdict(status)))


def status(run_dir: Path, rule: str) -> Status | None:
    """The last status the tap wrote for `rule`, None when there is none."""
    doc = _read(rundir.tap_status(run_dir, rule))
    try:
        return Status(**doc)
    except TypeError:
        return None


def _read(path: Path) -> dict[str, Any]:
    return rundir.read_object(path) or {}
