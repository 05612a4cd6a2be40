"""The fork server's side of its control channel (the protocol: pipeline.supervision.forkctl).

Invariants: nothing a client sends can stop or block the fork server. Sockets are non-blocking and served from the
fork server's one loop; a request line over forkctl.MAX_LINE, a line that is not a JSON object with an `op`, an
unknown op or bad fields get an error answer (a line too long also closes the connection); an unexpected error
while answering is logged and answered as such; at most MAX_CLIENTS connections are kept (the least recently
active one is closed for a new one); a client that does not read its answers is dropped once MAX_PENDING bytes
wait for it. The socket is made mode 0600 before it listens.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.supervision.forkctl import MAX_LINE

log = logging.getLogger("pipeline.forkserver")

MAX_CLIENTS = 16
MAX_PENDING = 16 * 1024 * 1024  # answer bytes waiting for a client before it is dropped

Answer = Callable[[dict[str, Any]], dict[str, Any]]


class Refused(Exception):
    """A request the fork server will not carry out; the message is the answer's `error`."""


class Client:
    """One connection: what it sent that is not a whole line yet, and what it has not read yet."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.received = bytearray()
        self.unsent = bytearray()
        self.active = time.monotonic()


class Channel:
    """The listening socket at `path` and its clients; `answer(request)` turns a request into the answer's fields
    (raising Refused for a request it will not carry out)."""

    def __init__(self, path: Path, answer: Answer) -> None:
        self.path, self.answer = path, answer
        if path.is_socket():
            path.unlink()  # left by a fork server that was killed (the run dir is this user's alone)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        os.chmod(path, 0o600)
        self.listener.listen(4 * MAX_CLIENTS)
        self.listener.setblocking(False)
        self.clients: dict[socket.socket, Client] = {}

    def fds(self) -> list[int]:
        """Every descriptor of the channel (a forked worker closes them)."""
        return [self.listener.fileno(), *(s.fileno() for s in self.clients)]

    def readers(self) -> list[socket.socket]:
        return [self.listener, *self.clients]

    def writers(self) -> list[socket.socket]:
        return [s for s, c in self.clients.items() if c.unsent]

    def serve(self, readable: list[Any], writable: list[Any]) -> None:
        """Accept, read and answer what `select` found ready."""
        for sock in writable:
            if sock in self.clients:
                self._send(self.clients[sock])
        for sock in readable:
            if sock is self.listener:
                self._accept()
            elif sock in self.clients:
                self._read(self.clients[sock])

    def _accept(self) -> None:
        """Take every connection waiting (a full backlog would refuse the next client)."""
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            sock.setblocking(False)
            if len(self.clients) >= MAX_CLIENTS:
                self.drop(min(self.clients.values(), key=lambda c: c.active))
            self.clients[sock] = Client(sock)

    def _read(self, client: Client) -> None:
        try:
            data = client.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.drop(client)
            return
        client.active = time.monotonic()
        client.received += data
        while b"\n" in client.received:
            line, _, rest = bytes(client.received).partition(b"\n")
            client.received[:] = rest
            self._reply(client, self.respond(line))
        if len(client.received) > MAX_LINE:
            self._reply(client, {"ok": False, "error": f"a request line is at most {MAX_LINE} bytes"})
            self.drop(client)

    def respond(self, line: bytes) -> dict[str, Any]:
        """The answer to one request line."""
        try:
            request = json.loads(line)
        except (ValueError, RecursionError):
            return {"ok": False, "error": "a request is one JSON object per line"}
        if not isinstance(request, dict) or not isinstance(request.get("op"), str):
            return {"ok": False, "error": 'a request is a JSON object with an "op" string'}
        try:
            return {**self.answer(request), "ok": True}
        except Refused as e:
            return {"ok": False, "error": str(e)}
        except Exception:  # a bug answering must not end the fork server (and its workers)
            log.exception("control request %.200r failed", line)
            return {"ok": False, "error": "internal error (see the fork server's log)"}

    def _reply(self, client: Client, answer: dict[str, Any]) -> None:
        if client.sock not in self.clients:
            return
        client.unsent += json.dumps(answer).encode() + b"\n"
        self._send(client)

    def _send(self, client: Client) -> None:
        try:
            sent = client.sock.send(client.unsent)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.drop(client)
            return
        del client.unsent[:sent]
        if len(client.unsent) > MAX_PENDING:
            log.warning("a control client does not read its answers: dropped")
            self.drop(client)

    def drop(self, client: Client) -> None:
        """Close a client's connection."""
        self.clients.pop(client.sock, None)
        client.sock.close()

    def close(self) -> None:
        """Close every connection and the listening socket, and remove the socket file."""
        for client in list(self.clients.values()):
            self.drop(client)
        self.listener.close()
        try:
            self.path.unlink()
        except OSError:
            pass
