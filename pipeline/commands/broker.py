"""Embedded MQTT 3.1.1 broker (amqtt), for a stack with no broker of its own.

amqtt is an optional dependency (the ``embedded`` extra), so it is imported inside :func:`run`.
The config uses the amqtt >= 0.11 style: a ``plugins`` mapping of dotted class path -> options.
Only the anonymous-auth plugin is loaded (amqtt refuses every CONNECT when no auth plugin
answers); the event/packet logger and ``$SYS`` plugins of amqtt's default config are left out.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from typing import Any

_MISSING = "the embedded broker needs amqtt: pip install 'edge-pipeline[embedded]'"
_POLL_S = 0.2
_WILDCARDS = {"", "0.0.0.0", "::"}


def _bind(host: str, port: int) -> str:
    """amqtt's ``bind`` string; IPv6 literals need brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def broker_config(host: str, port: int) -> dict[str, Any]:
    """amqtt 0.11+ broker config: one TCP listener, anonymous clients, no $SYS topics."""
    return {
        "listeners": {"default": {"type": "tcp", "bind": _bind(host, port)}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


def _quiet() -> None:
    for name in ("amqtt", "transitions"):
        logging.getLogger(name).setLevel(logging.WARNING)


async def _serve(broker_cls: Any, host: str, port: int, stop: threading.Event) -> None:
    broker = broker_cls(broker_config(host, port))
    await broker.start()
    try:
        while not stop.is_set():
            await asyncio.sleep(_POLL_S)
    finally:
        await broker.shutdown()


def run(host: str, port: int, stop: threading.Event) -> None:
    """Run an amqtt broker listening on host:port (TCP, anonymous allowed, no websocket listener,
    no $SYS topics) until ``stop`` is set, then shut it down cleanly. Blocks; owns its event loop."""
    try:
        from amqtt.broker import Broker
    except ImportError as exc:
        raise RuntimeError(_MISSING) from exc
    _quiet()
    asyncio.run(_serve(Broker, host, port, stop))


def port_in_use(host: str, port: int) -> bool:
    """True when something already listens on host:port (try to connect with a short timeout)."""
    target = "127.0.0.1" if host in _WILDCARDS else host
    try:
        with socket.create_connection((target, port), timeout=0.5):
            return True
    except OSError:
        return False
