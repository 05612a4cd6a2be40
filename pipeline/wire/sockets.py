"""Small ZeroMQ socket helpers shared by the stages."""

from __future__ import annotations

import zmq


def drain(sock: zmq.Socket, limit: int = 1000, multipart: bool = False) -> list:
    """Everything readable now (up to `limit` messages), without blocking."""
    out = []
    recv = sock.recv_multipart if multipart else sock.recv
    try:
        while len(out) < limit:
            out.append(recv(zmq.NOBLOCK))
    except zmq.Again:
        pass
    return out
