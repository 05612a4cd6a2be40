"""Which Host and Origin names the control API answers to, and what its listen address exposes.

No falcon or pydantic here: `pipeline check` and the schema use it too.

A name is allowed when it is an IP literal (v4 or v6: a DNS-rebinding page reaches us under the attacker's
own name, never under an address; probes send the pod's IP), `localhost`, the host of `control.listen`, or one
of `control.allowed_hosts`. Names compare lowercased, without a trailing dot.
"""

from __future__ import annotations

import ipaddress
import re
import ssl
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
ALWAYS = frozenset({"localhost"})


def normal(name: str) -> str:
    return name.strip().lower().rstrip(".")


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True


def name_problem(name: str) -> str | None:
    """Why `name` cannot be an entry of control.allowed_hosts, or None."""
    n = normal(name)
    if is_ip(n):
        return "IP addresses are always allowed: list only DNS names"
    if len(n) > 253 or not all(LABEL.fullmatch(label) for label in n.split(".")):
        return "expected a DNS name (letters, digits, '-' and '.'; no scheme, port or wildcard)"
    return None


def host_of(header: str) -> str:
    """The host part of a Host header value: `[v6]:port` -> `v6`, `name:port` -> `name`."""
    h = header.strip()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    name, sep, port = h.rpartition(":")
    return name if sep and port.isdigit() else h


def listen_host(listen: str) -> str:
    return host_of(listen)


class Allowed:
    """The set of names one control API answers to."""

    def __init__(self, listen: str, names: Iterable[str]) -> None:
        host = normal(listen_host(listen))
        self.names = frozenset({*ALWAYS, *(normal(n) for n in names), *(() if is_ip(host) else (host,))})

    def host(self, header: str) -> bool:
        name = normal(host_of(header))
        return is_ip(name) or name in self.names

    def origin(self, header: str) -> bool:
        """`Origin: scheme://host[:port]`; "null" (sandboxed frames, file: pages) is no host of ours."""
        try:
            name = urlsplit(header.strip()).hostname
        except ValueError:
            return False
        return name is not None and self.host(name if ":" not in name else f"[{name}]")


def loopback(listen: str) -> bool:
    host = normal(listen_host(listen))
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure(control: Any) -> list[str]:
    """What to set when control listens beyond loopback without TLS or without a token (empty: nothing)."""
    if loopback(control.listen):
        return []
    out = []
    if control.tls is None:
        out.append(f"control listens on {control.listen} without TLS: the token and every answer cross the network "
                   "in clear; set control.tls: {cert: FILE, key: FILE} or listen on 127.0.0.1")
    if control.token is None:
        out.append(f"control listens on {control.listen} without a token: anyone who reaches it reads /rules, "
                   "/models, /stages, /metrics; set control.token (and protect_reads: true) or listen on 127.0.0.1")
    elif not control.protect_reads:
        out.append(f"control listens on {control.listen} with protect_reads: false: anyone who reaches it reads "
                   "/rules, /models, /stages, /metrics; set control.protect_reads: true")
    return out


def local_url(control: Any) -> str:
    """The control API's base URL from this box: https with control.tls; 0.0.0.0 and :: as loopback."""
    host, port = control.listen.rsplit(":", 1)
    host = {"0.0.0.0": "127.0.0.1", "*": "127.0.0.1", "::": "[::1]", "[::]": "[::1]"}.get(host, host)
    return f"{'https' if control.tls is not None else 'http'}://{host}:{port}"


def pinned_context(control: Any) -> ssl.SSLContext | None:
    """For a client on this box: trusts exactly control.tls.cert (self-signed or not), whatever name it bears;
    None without TLS."""
    if control.tls is None:
        return None
    ctx = ssl.create_default_context(cafile=str(control.tls.cert))
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    ctx.check_hostname = False
    return ctx
