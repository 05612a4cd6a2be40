"""The feedback ingress receives (credits and beats from workers, confirms from egress; see pipeline.wire.frames),
checked before it touches any state: each reader returns the frame's content, or raises `BadFrame` saying what is
wrong with it.

Invariant: nothing here trusts the peer. A worker identity is at most 255 bytes of UTF-8 (ZeroMQ gives
peers that set none a binary one), numbers are ints in their range, strings are strings.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from pipeline.errors import DecodeError, PipelineError
from pipeline.wire import frames

MAX_IDENT = 255


class BadFrame(PipelineError):
    """A control frame that is malformed or names what does not exist; the stage counts it and goes on."""


class Beat(NamedTuple):
    """A worker's heartbeat (`free`: its credit) or its report of a timed-out call (`msg_id`, `answered`)."""

    ident: bytes
    index: int
    kind: int
    free: int
    msg_id: str | None
    answered: list[str]


def _unpack(frame: bytes) -> Any:
    try:
        return frames.unpack(frame)
    except DecodeError as e:
        raise BadFrame(str(e)) from None


def _ident(raw: Any) -> bytes:
    ident = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    if not isinstance(ident, bytes) or not ident or len(ident) > MAX_IDENT:
        raise BadFrame(f"a worker identity must be 1 to {MAX_IDENT} bytes (got {raw!r:.80})")
    try:
        ident.decode("utf-8")
    except UnicodeDecodeError:
        raise BadFrame(f"a worker identity that is not UTF-8: {ident!r:.80}") from None
    return ident


def _count(value: Any, what: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise BadFrame(f"{what} must be an int from {low} to {high} (got {value!r:.80})")
    return value


def credit(parts: list[bytes]) -> tuple[bytes, int]:
    """(worker identity, credit) of a [identity, [CREDIT, n]] message on a rule's ROUTER."""
    if len(parts) != 2:
        raise BadFrame(f"a credit is one frame behind the identity (got {len(parts)} parts)")
    body = _unpack(parts[1])
    if not isinstance(body, list) or len(body) != 2 or body[0] != frames.CREDIT:
        raise BadFrame(f"expected [CREDIT, n] (got {body!r:.80})")
    return _ident(parts[0]), _count(body[1], "a credit", 1, frames.PREFETCH)


def beat(frame: bytes, rules: int) -> Beat:
    """A frame of the beats socket: [worker id, rule index, BEAT, free] or [.., TIMEOUT, [id | nil, [ids]]]."""
    body = _unpack(frame)
    if not isinstance(body, list) or len(body) != 4:
        raise BadFrame(f"expected [worker, rule index, kind, value] (got {body!r:.80})")
    raw, index, kind, value = body
    ident = _ident(raw)
    index = _count(index, "a rule index", 0, rules - 1)
    if kind == frames.BEAT:
        return Beat(ident, index, kind, _count(value, "a beat's free credit", 0, frames.PREFETCH), None, [])
    if kind != frames.TIMEOUT or not isinstance(value, list) or len(value) != 2:
        raise BadFrame(f"expected a BEAT or a TIMEOUT [message id, [answered ids]] (got {body!r:.80})")
    msg_id, answered = value
    if not (msg_id is None or isinstance(msg_id, str)) or not isinstance(answered, list) or \
            not all(isinstance(a, str) for a in answered):
        raise BadFrame(f"a TIMEOUT's value must be [message id or nil, [ids]] (got {value!r:.80})")
    return Beat(ident, index, kind, 0, msg_id, answered)


class Confirm(NamedTuple):
    """Egress has this result safe: the message, its rule and input broker, and the worker that answered it
    ("" for an error record ingress sent itself). For a keyed rule's result (`keyed`): `state`, the key's state
    as stored (value, version), None when the call left it unchanged; `stale`: the result was computed from an
    older state and nothing of it was stored."""

    msg_id: str
    rule: str
    broker: str
    sender: str
    state: tuple[bytes, int] | None = None
    keyed: bool = False
    stale: bool = False


def _confirm(c: Any) -> Confirm | None:
    if not isinstance(c, list) or len(c) not in (4, 5) or not all(isinstance(x, str) for x in c[:4]):
        return None
    if len(c) == 4:
        return Confirm(*c)
    st = c[4]
    if st is None or st is False:
        return Confirm(*c[:4], keyed=True, stale=st is False)
    if not (isinstance(st, list) and len(st) == 2 and isinstance(st[0], bytes) and type(st[1]) is int and st[1] > 0):
        return None
    return Confirm(*c[:4], state=(st[0], st[1]), keyed=True)


def confirms(frame: bytes) -> list[Confirm] | None:
    """The confirms of a frame from egress; None for [] (egress (re)started)."""
    body = _unpack(frame)
    if body == []:
        return None
    confirms = [_confirm(c) for c in body] if isinstance(body, list) else [None]
    if None in confirms:
        raise BadFrame(f"expected a list of [message id, rule, broker, sender(, nil | false | [state, version])] "
                       f"(got {body!r:.80})")
    return confirms  # type: ignore[return-value]
