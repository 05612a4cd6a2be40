"""Which keys of an old file are read, which are ignored, which are misspelt, and which version a func is.

Invariants: a key is either read (listed in a vocabulary below), ignored (named once, by its path with `[*]`
for list indexes, in `Report.ignored`), or refused as a misspelling (same letters in another case, or close
to a read key: `modelMD5`, `devcies`). The subtrees of ignored keys are not looked into.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

# native sections an old file may carry too: kept as they are (the old runtime ignored them)
NATIVE = ("name", "control", "endpoints", "outbox", "packages", "run_dir", "data_dir")

TOP = ("mqtts", "rules", "funcs", *NATIVE)
MQTT = ("name", "broker", "qos", "retain", "username", "password")
RULE = ("sub", "pub")
SUB = ("name", "clientId", "topic")
PUB = ("name", "clientId", "timeout", "topic")
FUNC_V1 = ("model_address", "model_md5", "modelName", "deviceName", "pointName")
FUNC_V2 = ("model_address", "model_md5", "modelName", "device")
FUNC_V3 = ("modelAmd64Address", "modelArm64Address", "modelAddress", "modelMd5", "modelName", "devices")
DEVICE_V2 = ("deviceName", "deviceParseExpression", "pointName", "pointParseExpression")
DEVICE_V3 = ("deviceName", "deviceAttr")
ATTR_V3 = ("attrName", "attrValue", "attrExpression")
FUNC = tuple(dict.fromkeys((*FUNC_V1, *FUNC_V2, *FUNC_V3)))

# keys that tell a func's version: only version 3 has these, only version 2 / version 1 have those
_MARKS = {3: FUNC_V3[:4] + ("devices",), 2: ("device",), 1: ("deviceName", "pointName")}
_OLDER = ("model_address", "model_md5")  # versions 1 and 2


@dataclass
class Report:
    """What reading an old file found besides its content: problems (each fatal), keys ignored (each named
    once; a dict keeps their order), and warnings (where the file behaves differently than before)."""

    problems: list[str] = field(default_factory=list)
    ignored: dict[str, None] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def misspelling(key: str, known: tuple[str, ...]) -> str | None:
    """The read key that `key` looks like a misspelling of, or None."""
    for k in known:
        if k.casefold() == key.casefold():
            return k
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.8)
    return close[0] if close else None


def scan(node: dict[str, Any], known: tuple[str, ...], at: str, report: Report) -> None:
    """Record every key of `node` (at key path `at`) that is not in `known`: refused or ignored."""
    for key in node:
        if key in known:
            continue
        text = str(key)
        where = f"{at}.{text}" if at else text
        like = misspelling(text, known)
        if like is not None:
            report.problems.append(f"{where}: unknown key, read as a misspelling of {like!r} (got {text!r:.200})")
        else:
            report.ignored[_generic(where)] = None


def _generic(path: str) -> str:
    """`funcs[3].note` -> `funcs[*].note`: an ignored key is named once, whatever list entry it is in."""
    out, depth = [], 0
    for ch in path:
        if ch == "[":
            depth += 1
            out.append("[*]")
        elif ch == "]":
            depth -= 1
        elif depth == 0:
            out.append(ch)
    return "".join(out)


def versions(func: dict[str, Any]) -> frozenset[int]:
    """The versions whose shape a func can be of (all three when no key tells); ValueError naming the keys when
    it mixes the shapes of two versions."""
    found = {v: [k for k in keys if k in func] for v, keys in _MARKS.items()}
    older = [k for k in _OLDER if k in func]
    told = [v for v in (3, 2, 1) if found[v]]
    if (3 in told and older) or len(told) > 1:
        keys = sorted({k for v in told for k in found[v]} | set(older if 3 in told else ()))
        raise ValueError(f"mixes the keys of two versions of the old format: {', '.join(keys)}")
    if told:
        return frozenset(told)
    return frozenset((1, 2) if older else (1, 2, 3))


def telling(func: dict[str, Any]) -> list[str]:
    """The keys of a func that tell its version (for messages)."""
    return [k for k in (*FUNC_V3[:4], "devices", "device", "deviceName", "pointName", *_OLDER) if k in func]
