"""falcon middleware that every request passes first, before the token check, on every path (/healthz too).

- Host: its host part must be allowed (pipeline.control.hosts); otherwise 421 Misdirected Request, which names
  the Host refused and how to allow it. This is what stops DNS rebinding: the browser sends the attacker's name.
  A request without Host (HTTP/1.0) passes: every browser sends one, so such a request is no rebinding page.
- Origin: when present, its host must be allowed too; otherwise 403 naming the origin.
- Body: no endpoint takes one; a body over MAX_BODY bytes, or of unknown length (chunked), is 413 naming the limit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import falcon

from pipeline.control.hosts import Allowed

if TYPE_CHECKING:  # pipeline.config.load loads pydantic; a stage gets its config from pipeline.config.snapshot
    from pipeline.config.load import Control

MAX_BODY = 1024
SHOWN = 200  # characters of a refused Host or Origin repeated in the answer


class Gate:
    """Falcon middleware: refuses a request whose Host or Origin is not a name of this control API."""

    def __init__(self, control: Control) -> None:
        self.allowed = Allowed(control.listen, control.allowed_hosts)

    def process_request(self, req: falcon.Request, _resp: falcon.Response) -> None:
        host = req.get_header("Host")
        if host is not None and not self.allowed.host(host):
            raise falcon.HTTPError(
                falcon.HTTP_421, title="host not allowed",
                description=f"Host {host[:SHOWN]!r} is not a name of this control API (allowed: IP addresses, "
                f"{', '.join(sorted(self.allowed.names))}); to reach it by that name add it to "
                "control.allowed_hosts")
        origin = req.get_header("Origin")
        if origin is not None and not self.allowed.origin(origin):
            raise falcon.HTTPForbidden(
                title="origin not allowed",
                description=f"Origin {origin[:SHOWN]!r} is not a page of this control API (allowed: IP addresses, "
                f"{', '.join(sorted(self.allowed.names))}); add its host to control.allowed_hosts")
        _body(req)


def _body(req: falcon.Request) -> None:
    length = req.content_length
    if req.get_header("Transfer-Encoding") is not None:
        why = "a body of unknown length (Transfer-Encoding)"
    elif length is not None and length > MAX_BODY:
        why = f"a body of {length} bytes"
    else:
        return
    raise falcon.HTTPError(falcon.HTTP_413, title="body too large",
                           description=f"{why} refused: no endpoint takes a body; the limit is {MAX_BODY} bytes")
