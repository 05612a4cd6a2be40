"""JSON in, JSON (or bytes) out, and the error record: the data contract with models."""

from __future__ import annotations

import base64
from typing import Any

import orjson

from pipeline.errors import PipelineError

MAX_RECORD_PAYLOAD = 64 * 1024
MAX_ERROR_TEXT = 4096  # characters of an exception text kept in an error record (a traceback can be any size)
_DUMP_OPTS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


class BadPayload(PipelineError, ValueError):
    """The input payload is not UTF-8 JSON; the message says which."""


class Unserialisable(PipelineError, TypeError):
    """The model's return value cannot be published."""


def decode_event(payload: bytes) -> Any:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError as e:
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError as u:
            raise BadPayload(f"payload is not UTF-8: {u.reason} at byte {u.start}") from None
        raise BadPayload(f"payload is not JSON: {e}") from None


def _fallback(value: Any) -> Any:
    # numpy scalars that orjson does not take natively, tuples from C extensions, sets, Decimals
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, set | frozenset):
        return list(value)
    if type(value).__name__ == "Decimal":
        return float(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def encode_value(value: Any) -> bytes:
    """A model's return value as the bytes to publish: bytes as is, anything else as UTF-8 JSON.

    NaN and +/-Infinity become null; numpy arrays and scalars become numbers and lists.
    """
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    try:
        return orjson.dumps(value, default=_fallback, option=_DUMP_OPTS)
    except (TypeError, orjson.JSONEncodeError) as e:
        raise Unserialisable(f"result of type {type(value).__name__} cannot be published: {e}") from None


def error_record(
    *, rule: str, topic: str, reason: str, error: BaseException | str, message_id: str, payload: bytes,
    attempt: int = 1, max_payload: int = MAX_RECORD_PAYLOAD, topic_encoding: str | None = None,
) -> bytes:
    """The JSON error record published on a rule's error topic: the payload cut at `max_payload` bytes, the
    error text at MAX_ERROR_TEXT characters; `topic_encoding` ("base64") when `topic` holds a topic's bytes."""
    cut = payload[:max_payload]
    try:
        payload.decode("utf-8")
        text, encoding = cut.decode("utf-8", errors="ignore"), "utf-8"  # ignore: a character cut in two
    except UnicodeDecodeError:
        text, encoding = base64.b64encode(cut).decode("ascii"), "base64"
    err = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    if len(err) > MAX_ERROR_TEXT:
        err = err[:MAX_ERROR_TEXT] + f"... ({len(err) - MAX_ERROR_TEXT} more characters)"
    record = {
        "rule": rule,
        "topic": topic,
        "reason": reason,
        "error": err,
        "message_id": message_id,
        "attempt": attempt,
        "payload": text,
        "payload_encoding": encoding,
        "payload_truncated": len(payload) > max_payload,
    }
    if topic_encoding is not None:
        record["topic_encoding"] = topic_encoding
    return orjson.dumps(record)


def shrink_record(record: bytes, max_bytes: int) -> bytes | None:
    """An error record cut to `max_bytes` by cutting its payload text (marked truncated); None when it is not
    a record or does not fit even with no payload."""
    try:
        rec = orjson.loads(record)
        text = rec["payload"]
    except (orjson.JSONDecodeError, TypeError, KeyError):
        return None
    if not isinstance(text, str):
        return None
    out = record
    for _ in range(4):  # each pass cuts what is over, in characters, which are at least one byte each
        over = len(out) - max_bytes
        if over <= 0:
            return out
        if not text:
            return None
        text = text[:max(0, len(text) - over - 16)]
        if rec.get("payload_encoding") == "base64":
            text = text[:len(text) // 4 * 4]  # whole base64 quads still decode
        rec.update(payload=text, payload_truncated=True)
        out = orjson.dumps(rec)
    return out if len(out) <= max_bytes else None
