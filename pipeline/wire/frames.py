"""The envelopes that travel over ZeroMQ, and their msgpack framing.

One frame carries a batch: a msgpack array of envelopes, each a msgpack array (positional, no per-message
dict keys). Envelopes are NamedTuples: immutable, and msgpack packs them as arrays with no
conversion step (a frozen dataclass + astuple cost 5x more per message).

`Message` goes ingress -> workers; `Result` goes workers -> egress, exactly one per Message, so every
stage can count exactly and, later, acknowledge by (broker, mid).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple, TypeVar

import msgpack

from pipeline import digest
from pipeline.errors import DecodeError
from pipeline.keyed.keys import MAX_KEY
from pipeline.models import codec

VERSION = 3  # 3: envelopes carry a key, its state and what tells a message delivered again

# Result kinds
PUBLISH = 0  # publish payload on topic
ERROR = 1  # publish payload (a JSON error record) on the rule's error topic
NOTHING = 2  # the model returned None: nothing to publish, but the message is done


class Message(NamedTuple):
    """One MQTT message for one rule, ingress -> worker."""

    id: str  # unique per received MQTT message: "<ingress boot id>-<counter>"
    rule: str
    broker: str  # broker the message came from
    topic: str
    payload: bytes
    qos: int
    mid: int  # MQTT packet id on the ingress connection (0 for QoS 0)
    attempt: int  # 1 on first dispatch
    received_at: float  # unix time when ingress got it
    key: str | None = None  # the message's key value (a keyed rule), else None
    state: bytes = b""  # the key's committed state (see pipeline.keyed.store.encode), b"": empty
    dup: bool = False  # the broker sent it again (MQTT DUP): it may be one whose result is stored already
    base: int = 0  # the version of `state` (pipeline.keyed.store), 0: none stored


class Result(NamedTuple):
    """The answer to exactly one `Message`, worker (or ingress for a dead letter) -> egress."""

    message_id: str
    rule: str
    kind: int  # PUBLISH | ERROR | NOTHING
    topic: str  # output topic (rendered) or error topic; "" for NOTHING
    payload: bytes
    source_broker: str
    source_mid: int
    source_qos: int  # 1: ingress waits for this result to be safe before acking upstream
    received_at: float
    latency: float  # seconds spent in the model call
    key: str | None = None  # the message's key value (a keyed rule), else None
    state: bytes | None = None  # the key's new state, None when the call left it unchanged
    digest: bytes = b""  # of the input's topic and payload (keyed QoS 1): tells the broker's DUP of this message
    dup: bool = False  # the input was the broker's DUP
    base: int = 0  # the version of the state the call started from


E = TypeVar("E", Message, Result)


def result_problem(r: Result) -> str | None:
    """What makes a decoded Result unfit to act on (a field of the wrong type or out of range), or None. Frames
    come from workers that run model code, and over tcp from whoever reaches the port: nothing is trusted."""
    if type(r.message_id) is not str or type(r.rule) is not str or type(r.topic) is not str or \
            type(r.source_broker) is not str:
        return "message_id, rule, topic and source_broker must be strings"
    if not r.message_id.isascii() or len(r.message_id) > 64:
        return f"a message id is ASCII, 64 characters at most (got {r.message_id!r:.80})"
    if type(r.kind) is not int or r.kind not in (PUBLISH, ERROR, NOTHING):
        return f"kind must be {PUBLISH}, {ERROR} or {NOTHING} (got {r.kind!r:.40})"
    if type(r.payload) is not bytes:
        return f"the payload must be bytes (got {type(r.payload).__name__})"
    if type(r.source_qos) is not int or r.source_qos not in (0, 1) or type(r.source_mid) is not int or \
            not 0 <= r.source_mid <= 0xFFFF:
        return f"source_qos must be 0 or 1 and source_mid 0 to 65535 (got {r.source_qos!r:.20}, {r.source_mid!r:.20})"
    t, lat = r.received_at, r.latency  # finite and in range: they go into SQLite and the latency sums
    if type(t) not in (int, float) or type(lat) not in (int, float) or not (0 <= t < 1e11 and 0 <= lat < 1e7):
        return f"received_at and latency must be unix time and seconds (got {t!r:.30}, {lat!r:.30})"
    return _keyed_problem(r)


def _keyed_problem(r: Result) -> str | None:
    if not (r.key is None or (type(r.key) is str and 0 < len(r.key) <= MAX_KEY)):
        return f"a key is a string of 1 to {MAX_KEY} characters or nil (got {r.key!r:.80})"
    if not (r.state is None or (type(r.state) is bytes and r.key is not None)):
        return f"a state is bytes, and only with a key (got {type(r.state).__name__})"
    if type(r.digest) is not bytes or len(r.digest) > 32 or type(r.dup) is not bool:
        return "a digest is at most 32 bytes and dup a boolean"
    if type(r.base) is not int or not 0 <= r.base < 1 << 62:
        return f"a base version is an int from 0 (got {r.base!r:.30})"
    return None


def result_for(msg: Message, kind: int, topic: str, payload: bytes, latency: float) -> Result:
    """The Result answering `msg` (a keyed message's state unchanged)."""
    return Result(msg.id, msg.rule, kind, topic, payload, msg.broker, msg.mid, msg.qos, msg.received_at, latency,
                  msg.key, None, digest_of(msg) if msg.key is not None and msg.qos else b"", msg.dup, msg.base)


def digest_of(msg: Message) -> bytes:
    """16 bytes of BLAKE2b over the message's topic and payload: what tells the broker's DUP of a stored one."""
    h = digest.blake2b(msg.topic.encode("utf-8", "surrogatepass"), digest_size=16)
    h.update(b"\0")
    h.update(msg.payload)
    return h.digest()


def error_result(msg: Message, topic: str, reason: str, err: BaseException | str, latency: float = 0.0) -> Result:
    """An ERROR Result carrying the JSON error record for `msg`."""
    record = codec.error_record(rule=msg.rule, topic=msg.topic, reason=reason, error=err, message_id=msg.id,
                                payload=msg.payload, attempt=msg.attempt,
                                topic_encoding="base64" if reason == "bad_topic" else None)
    return result_for(msg, ERROR, topic, record, latency)


# Control messages (small msgpack arrays), besides the data frames:
#   worker -> ingress, on the rule's DEALER:   [CREDIT, n]          n more messages may be sent to me
#   worker -> ingress, on beats (PUSH):        [worker id, rule index, BEAT, free credit]
#                                              [worker id, rule index, TIMEOUT, [message id, [answered ids]]]
#                                              (message id nil: a handler_batch call of several timed out)
#   egress -> ingress, on confirms (PUSH):     [[message id, rule, broker, sender(, state)], ...]   these results
#                                              are safe; state, for a keyed rule's result: [value, version] stored,
#                                              nil: unchanged, false: not stored (computed from an older state);
#                                              [] once at egress start: results sent to an earlier egress are lost
CREDIT, BEAT, TIMEOUT = 0, 1, 2
PREFETCH = 64  # messages a worker may hold (its first CREDIT); a BEAT's free credit is PREFETCH - what it holds


def pack(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(frame: bytes) -> object:
    try:
        return msgpack.unpackb(frame, raw=False)
    except (ValueError, msgpack.UnpackException) as e:
        raise DecodeError(f"bad control frame ({len(frame)} bytes): {e}") from e


def encode(items: Iterable[Message | Result], sender: str = "") -> bytes:
    """One frame for a batch of envelopes of one kind; `sender`: the worker that made them ("" for ingress)."""
    return msgpack.packb([VERSION, list(items), sender], use_bin_type=True)


def decode(frame: bytes, kind: type[E]) -> list[E]:
    """Decode a frame made by `encode`; raise DecodeError on anything else."""
    return decode_from(frame, kind)[0]


def decode_from(frame: bytes, kind: type[E]) -> tuple[list[E], str]:
    """The envelopes of a frame made by `encode`, and its sender; raise DecodeError on anything else."""
    try:
        body = msgpack.unpackb(frame, raw=False, use_list=False)
        if not isinstance(body, tuple) or not body:
            raise ValueError("not a frame of envelopes")
        if body[0] != VERSION:  # a stage of another version (a remote worker not yet upgraded)
            raise ValueError(f"envelope version {body[0]!r:.20}, expected {VERSION}")
        _, rows, sender = body
        if type(sender) is not str:
            raise ValueError(f"the sender must be a string (got {type(sender).__name__})")
        return [kind(*row) for row in rows], sender
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise DecodeError(f"bad {kind.__name__} frame ({len(frame)} bytes): {e}") from e
