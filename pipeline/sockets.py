"""Small ZeroMQ socket helpers shared by the stages."""

from __future__ import annotations

import zmq


def bind(ctx: zmq.Context, kind: int, address: str) -> zmq.Socket:
    """A socket of `kind` bound to `address` (ROUTERs refuse to drop frames for unknown peers)."""
    s = ctx.socket(kind)
    if kind == zmq.ROUTER:
        s.setsockopt(zmq.ROUTER_MANDATORY, 1)
    s.bind(address)
    return s


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
