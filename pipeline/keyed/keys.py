"""A rule's `key:`: which messages belong to one device, read from the topic or the decoded payload.

A key is one part or a list of parts; a part is `{N}` (level N of the input topic, from 0, as in output-topic
templates) or a dotted path into the decoded event (`deviceInfo.deviceName`; a number indexes a list). The key
of a message is its parts' values joined with "/". A part that is missing, empty, or not a string or a number
gives the message no key value (`NoKey`, saying which part).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, NamedTuple

from pipeline.errors import PipelineError

MAX_KEY = 256  # characters of a key value at most
_LEVEL = re.compile(r"\{(\d+)\}")
_SEGMENT = re.compile(r"[^.\s{}]+")


class NoKey(PipelineError):
    """A message without a value for its rule's key (the part is named in the message)."""


class Part(NamedTuple):
    """One part of a key: a topic level (`level` >= 0) or a path into the event (`path`)."""

    text: str
    level: int
    path: tuple[str | int, ...]


def parse(spec: str | list[str]) -> tuple[Part, ...]:
    """The parts of a `key:` value; ValueError saying what is wrong with it."""
    texts = [spec] if isinstance(spec, str) else list(spec)
    if not texts:
        raise ValueError("a key needs at least one part: a topic level such as {1} or a path such as deviceInfo.name")
    return tuple(_part(t) for t in texts)


def _part(text: str) -> Part:
    if not isinstance(text, str) or not text.strip():
        raise ValueError("a key part is {N} (a topic level) or a dotted path such as deviceInfo.deviceName")
    level = _LEVEL.fullmatch(text)
    if level:
        return Part(text, int(level.group(1)), ())
    segments = text.split(".")
    if not all(_SEGMENT.fullmatch(s) for s in segments):
        raise ValueError("a key part is {N} (a topic level) or a dotted path such as deviceInfo.deviceName")
    return Part(text, -1, tuple(int(s) if s.isdigit() else s for s in segments))


def check_levels(parts: tuple[Part, ...], topic_filter: str) -> None:
    """ValueError when a `{N}` part names a level the rule's subscription does not fix."""
    levels = topic_filter.split("/")
    for p in parts:
        if p.level >= 0 and (p.level >= len(levels) or "#" in levels[: p.level + 1]):
            raise ValueError(f"{p.text} refers to level {p.level} of the input topic, but filter '{topic_filter}' "
                             f"has levels 0..{len(levels) - 1 - levels.count('#')}")


def needs_event(parts: tuple[Part, ...]) -> bool:
    """Whether the key reads the payload (then it is decoded in ingress)."""
    return any(p.level < 0 for p in parts)


def key_of(parts: tuple[Part, ...], topic: str, event: Callable[[], Any]) -> str:
    """The key value of a message; `event()` gives its decoded payload (raising NoKey when it cannot be decoded).
    Raise NoKey naming the part without a value."""
    values = []
    for p in parts:
        v = _level(topic, p) if p.level >= 0 else _path(event(), p)
        if isinstance(v, bool) or not isinstance(v, str | int | float) or v == "":
            raise NoKey(f"key part {p.text} has no value in this message" if v is None or v == "" else
                        f"key part {p.text} is a {type(v).__name__}, not a string or number")
        values.append(v if isinstance(v, str) else repr(v))
    key = "/".join(values)
    if len(key) > MAX_KEY:
        raise NoKey(f"the key value is {len(key)} characters, over {MAX_KEY}")
    return key


def _level(topic: str, p: Part) -> str | None:
    levels = topic.split("/")
    return levels[p.level] if p.level < len(levels) else None


def _path(event: Any, p: Part) -> Any:
    v = event
    for s in p.path:
        if isinstance(s, int) and isinstance(v, list) and s < len(v):
            v = v[s]
        elif isinstance(v, dict) and str(s) in v:
            v = v[str(s)]
        else:
            return None
    return v
