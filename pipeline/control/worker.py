"""gunicorn's gthread worker, changed so that slow or idle clients cannot hold its threads.

gthread gives a connection a thread as soon as it is accepted (or, kept alive, becomes readable) and reads the
request head there with blocking calls: a client sending its head a byte at a time holds the thread for as long
as it likes, and a few such clients leave none for /healthz. Here:

- Plain HTTP: a thread reads what has arrived without blocking and, while the head (up to its blank line) is
  incomplete, hands the connection back to gthread's poller (its `_DEFER`), which holds no thread. The head must
  be complete HEAD_SECONDS after its first read, else the connection is closed; a connection that sends nothing
  is closed by gthread after `keepalive` seconds. Only a complete head is parsed, so parsing never waits.
- TLS (the handshake and the records need the blocking path) and pipelined requests: a watchdog thread shuts
  down (SHUT_RDWR) a connection whose head is not parsed HEAD_SECONDS after its thread took it; the blocked
  read returns and the thread is free.
- A request that came with a body is answered and the connection closed, not drained (no endpoint takes one).
- A connection that is to close is half-closed and drained by the poller for LINGER_SECONDS at most (RFC 9112
  9.6), not by gthread's blocking `close_graceful` on its main thread, which a client that neither sends nor
  closes held for its whole timeout, every other connection waiting.

Once the head is parsed (`handle_request`) no deadline applies: a reload may take as long as it takes.
Relies on gthread's `ThreadWorker.handle`, `handle_request`, `finish_request`, `run`, `murder_pending`,
`poller`, `nr_conns`, `_DEFER`, and `TConn`'s `sock`, `init()`, `close()`, `parser.unreader`, `data_ready`,
`is_http2`, checked in the gunicorn versions setup.cfg allows; tests/test_control_limits.py asserts they are there.
"""

from __future__ import annotations

import selectors
import socket
import threading
import time
from functools import partial
from typing import Any

from gunicorn.workers.gthread import _DEFER, ThreadWorker

HEAD_SECONDS = 2.0
HEAD_BYTES = 16384  # more than this without a blank line: the parser refuses it by gunicorn's limits
TICK = 0.25  # how often the watchdog looks
LINGER_SECONDS = 2.0
END = b"\r\n\r\n"


class Worker(ThreadWorker):
    """gunicorn's gthread worker that waits for a request's head without holding a thread: a slow or idle
    client cannot starve /healthz. Owns the connections still reading their head or lingering after close."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lock = threading.Lock()
        self.heads: dict[Any, float] = {}  # connection -> deadline, while a thread waits for its head
        self.partial: dict[Any, tuple[float, bytearray]] = {}  # connection -> (first read, head so far)
        self.lingering: dict[Any, float] = {}  # closed for writing, drained until the peer closes or this time

    def handle(self, conn: Any) -> Any:
        if self.cfg.is_ssl or conn.is_http2 or (conn.parser is not None and conn.parser.unreader.buf.getvalue()):
            return self._watched(conn)
        head = self._read_head(conn)
        if head is None:
            return _DEFER
        if head is False:
            self.log.debug("closing %s: no complete request head within %ss", conn.client, HEAD_SECONDS)
            return False
        conn.data_ready = True
        conn.init()
        conn.parser.unreader.unread(head)
        return self._watched(conn)

    def _read_head(self, conn: Any) -> bytes | bool | None:
        """The head and what follows it; None: not complete yet; False: not complete in time."""
        with self.lock:
            start, buf = self.partial.pop(conn, None) or (time.monotonic(), bytearray())
        conn.sock.setblocking(False)
        try:
            while data := conn.sock.recv(65536):
                buf += data
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            return bytes(buf)  # the parser meets the same error and closes
        else:
            return bytes(buf)  # end of stream
        if END in buf or len(buf) >= HEAD_BYTES:
            return bytes(buf)
        if time.monotonic() - start > HEAD_SECONDS:
            return False
        with self.lock:
            self.partial[conn] = (start, buf)
        return None

    def _watched(self, conn: Any) -> Any:
        with self.lock:
            self.heads[conn] = time.monotonic() + HEAD_SECONDS
        try:
            return super().handle(conn)
        finally:
            with self.lock:
                self.heads.pop(conn, None)

    def handle_request(self, req: Any, conn: Any) -> Any:
        with self.lock:
            self.heads.pop(conn, None)
        keep = super().handle_request(req, conn)
        return keep and not any(
            (n == "CONTENT-LENGTH" and v.strip() != "0") or n == "TRANSFER-ENCODING" for n, v in req.headers)

    def finish_request(self, conn: Any, fs: Any) -> None:
        if fs.cancelled() or fs.exception() is not None or fs.result() is not False:
            super().finish_request(conn, fs)
            return
        self.nr_conns -= 1
        try:
            conn.sock.shutdown(socket.SHUT_WR)
            conn.sock.setblocking(False)
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._drain, conn))
        except (OSError, ValueError, KeyError):
            conn.close()
            return
        self.lingering[conn] = time.monotonic() + LINGER_SECONDS

    def _drain(self, conn: Any, _sock: Any) -> None:
        try:
            if conn.sock.recv(65536):
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self._bury(conn)

    def _bury(self, conn: Any) -> None:
        self.lingering.pop(conn, None)
        try:
            self.poller.unregister(conn.sock)
        except (OSError, ValueError, KeyError):
            pass
        conn.close()

    def murder_pending(self) -> None:
        super().murder_pending()
        now = time.monotonic()
        for conn in [c for c, deadline in self.lingering.items() if deadline <= now]:
            self._bury(conn)
        with self.lock:
            for conn in [c for c in self.partial if c.sock.fileno() < 0]:
                del self.partial[conn]

    def run(self) -> None:
        stop = threading.Event()
        threading.Thread(target=self._watch, args=(stop,), name="head-deadline", daemon=True).start()
        try:
            super().run()
        finally:
            stop.set()

    def _watch(self, stop: threading.Event) -> None:
        while not stop.wait(TICK):
            now = time.monotonic()
            with self.lock:
                late = [conn for conn, deadline in self.heads.items() if deadline <= now]
                for conn in late:
                    del self.heads[conn]
            for conn in late:
                self.log.debug("closing %s: no request head within %ss", conn.client, HEAD_SECONDS)
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
