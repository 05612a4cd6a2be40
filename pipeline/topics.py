"""MQTT topic filters and output-topic templates (pure functions, no I/O)."""

from __future__ import annotations

import re
from collections.abc import Callable

_PLACEHOLDER = re.compile(r"\{(\d+)\}")


def check_filter(topic: str) -> str:
    """Return `topic` when it is a valid subscription filter, else raise ValueError saying why."""
    if not topic:
        raise ValueError("topic filter is empty")
    if "\x00" in topic:
        raise ValueError("topic filter contains a NUL character")
    levels = topic.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ValueError("'#' must be a whole level and the last one")
        if "+" in level and level != "+":
            raise ValueError("'+' must be a whole level")
    return topic


def matches(topic_filter: str, topic: str) -> bool:
    """True when `topic` (a concrete topic name) matches `topic_filter`."""
    flevels, tlevels = topic_filter.split("/"), topic.split("/")
    if topic.startswith("$") and flevels[0] in ("+", "#"):
        return False  # MQTT 4.7.2: wildcards at the first level do not match $-topics
    for i, f in enumerate(flevels):
        if f == "#":
            return True
        if i >= len(tlevels) or (f != "+" and f != tlevels[i]):
            return False
    return len(flevels) == len(tlevels)


def check_template(template: str, topic_filter: str) -> str:
    """Validate an output-topic template against the input filter its {N} placeholders refer to."""
    if not template:
        raise ValueError("topic is empty")
    if "+" in template or "#" in template:
        raise ValueError("an output topic cannot contain the wildcards '+' or '#'")
    flevels = topic_filter.split("/")
    for n in (int(m) for m in _PLACEHOLDER.findall(template)):
        if n >= len(flevels) or "#" in flevels[: n + 1]:
            raise ValueError(
                f"{{{n}}} refers to level {n} of the input topic, but filter '{topic_filter}' "
                f"has fixed levels 0..{len(flevels) - 1 - flevels.count('#')}"
            )
    leftover = _PLACEHOLDER.sub("", template)
    if "{" in leftover or "}" in leftover:
        raise ValueError("braces are only allowed as {N} placeholders (N = input topic level)")
    return template


def compile_template(template: str) -> Callable[[str], str]:
    """Return a function rendering `template` for one input topic; fast path when there is no {N}."""
    if not _PLACEHOLDER.search(template):
        return lambda _topic: template
    parts = _PLACEHOLDER.split(template)  # literal, index, literal, index, ..., literal

    def render(topic: str) -> str:
        levels = topic.split("/")
        out = [parts[0]]
        for i in range(1, len(parts), 2):
            out.append(levels[int(parts[i])])
            out.append(parts[i + 1])
        return "".join(out)

    return render


MAX_TOPIC_BYTES = 65_535  # MQTT: a topic name is a UTF-8 string with a 16-bit length
# what MQTT 1.5.4 forbids or lets a server refuse in a UTF-8 string, and Mosquitto refuses (closing the
# connection): NUL and the other control characters, and the non-characters U+FDD0-FDEF and U+xFFFE / xFFFF
_REFUSED_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\ufdd0-\ufdef" +
                            "".join(chr(p << 16 | 0xFFFE) + chr(p << 16 | 0xFFFF) for p in range(17)) + "]")
_checked: dict[str, str | None] = {}  # publish_problem's answers for topics seen (output topics repeat)


def publish_problem(topic: object) -> str | None:
    """Why a broker would refuse `topic` as a PUBLISH topic name (and drop the connection), or None."""
    if type(topic) is not str:
        return f"the topic is not a string ({type(topic).__name__})"
    known = _checked.get(topic, False)
    if known is not False:
        return known  # type: ignore[return-value]
    problem = None
    if not topic:
        problem = "the topic is empty"
    elif "+" in topic or "#" in topic:
        problem = f"the topic {topic[:200]!r} holds a wildcard ('+' or '#')"
    elif _REFUSED_CHARS.search(topic):
        problem = f"the topic {topic[:200]!r} holds a control character or a non-character"
    else:
        try:
            if len(topic.encode("utf-8")) > MAX_TOPIC_BYTES:
                problem = f"the topic is over {MAX_TOPIC_BYTES} bytes ({topic[:80]!r}...)"
        except UnicodeEncodeError:
            problem = f"the topic {topic[:200]!r} is not valid UTF-8 (a lone surrogate)"
    if len(topic) <= 1024:
        if len(_checked) > 10_000:
            _checked.clear()
        _checked[topic] = problem
    return problem
