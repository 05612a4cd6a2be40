"""The fork server's control channel: JSON lines on the Unix socket `<run dir>/forkserver.sock`.

One request per line, one answer per line, in order. A request is an object with an `op` and its fields; an answer
is `{"ok": true, ...}` or `{"ok": false, "error": "why"}`. The operations (what `pipeline.stages.forkserver`
answers):

    list                           {"workers": [slot, ...], "exits": [exit, ...]}   (slot: name, rule, index, pid)
    start_spare  rule              {"pid": the spare's pid}      (a spare already running is stopped first)
    stop_spare   rule              {"pid": the pid stopped, 0 when there was none}
    replace      rule, index       {"pid": the pid stopped}      (the slot is forked again once that pid exited)

`index` is a regular slot's number (0 .. workers - 1). `exits` are the last processes that ended: name, rule,
index (None for a spare), pid, code (exit status, or None) and signal (the signal that killed it, or None).
Invariant: a request line is at most MAX_LINE bytes, an answer MAX_ANSWER; the socket is its user's alone (0600
in the 0700 run dir).
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.supervision import run_dir as rundir

MAX_LINE = 4096  # bytes of a request line
MAX_ANSWER = 16 * 1024 * 1024  # bytes of an answer line
TIMEOUT = 10.0  # seconds a call may take: the fork server answers at once, it never waits for a worker


class ForkServerError(PipelineError):
    """The fork server refused a request or did not answer; the message says which and why."""


class ForkServer:
    """A client of the fork server of the stack in `run_dir`: one connection, opened by the first call."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / rundir.FORKSERVER_SOCKET
        self.sock: socket.socket | None = None
        self.pending = b""

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request, return the answer's fields; ForkServerError when refused or unanswered."""
        try:
            if self.sock is None:
                self.sock = self._connect()
            self.sock.sendall(json.dumps({"op": op, **fields}).encode() + b"\n")
            answer = json.loads(self._line())
        except (OSError, ValueError) as e:
            self.close()
            raise ForkServerError(f"the fork server did not answer {op}: {e}") from None
        if not isinstance(answer, dict) or answer.get("ok") is not True:
            why = answer.get("error") if isinstance(answer, dict) else answer
            raise ForkServerError(f"the fork server refused {op}: {why}")
        return answer

    def _connect(self) -> socket.socket:
        """A connection; tried again while the fork server's backlog is full (a Unix socket says EAGAIN at once)."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(TIMEOUT)
            try:
                sock.connect(str(self.path))
                return sock
            except BlockingIOError:
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
            except BaseException:
                sock.close()
                raise

    def _line(self) -> bytes:
        assert self.sock is not None
        while b"\n" not in self.pending:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionResetError("connection closed")
            self.pending += chunk
            if len(self.pending) > MAX_ANSWER:
                raise ValueError("answer too long")
        line, _, self.pending = self.pending.partition(b"\n")
        return line

    def close(self) -> None:
        """Drop the connection (the next call opens a new one)."""
        if self.sock is not None:
            self.sock.close()
        self.sock, self.pending = None, b""
