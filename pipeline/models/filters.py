"""Native message filters, and the old runtime's device filters parsed into them.

Device filters are parsed, never evaluated. The old runtime evaluated `<value> <expression>` in Python; the
accepted expressions are `== data_to_dict[K1][K2]...` (the value equals the field) and
`in data_to_dict[K1]...` (optionally `.keys()`; the field, a mapping, list or string, contains the value),
K being quoted string keys, e.g. `["deviceInfo"]["deviceName"]`, `["deviceInfo"]["pointName"]`,
`["telemetry"]`. Anything else is refused at conversion. A field missing from the message makes the
condition false. The native form is `{"path": [...], "op": "==" | "!=" | "contains", "value": v}`, combined
with `{"all": [...]}` (the attributes of one device) and `{"any": [...]}` (the devices). Difference: the old
runtime honoured only the last attribute of a device; here all of them must hold.
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from typing import Any

OPS = ("==", "!=", "contains")
_KEY = r"""\[\s*(?:"([^"\\]*)"|'([^'\\]*)')\s*\]"""
_EXPR = re.compile(rf"""\s*(==|in(?=\s))\s*data_to_dict\s*((?:{_KEY}\s*)+)(\.keys\(\))?\s*""")
_MISSING = object()


def parse_expression(expression: Any, value: Any) -> dict[str, Any]:
    """One old device attribute (`value` + `expression`) as a native condition; ValueError if not accepted."""
    m = _EXPR.fullmatch(expression) if isinstance(expression, str) else None
    if m is None or (m.group(5) and m.group(1) != "in"):
        raise ValueError(f"unsupported filter expression {expression!r}: accepted are "
                         """'== data_to_dict["a"]["b"]...' and 'in data_to_dict["a"]...' (or .keys())""")
    if not isinstance(value, str | int | float | bool):
        raise ValueError(f"the value of expression {expression!r} must be a string or a number (got {value!r})")
    path = [a or b for a, b in re.findall(_KEY, m.group(2))]
    return {"path": path, "op": "==" if m.group(1) == "==" else "contains", "value": value}


def matches(filter: dict[str, Any], event: Any) -> bool:
    """Whether a decoded message passes a native filter (see the module docstring); no eval."""
    if "all" in filter:
        return all(matches(f, event) for f in filter["all"])
    if "any" in filter:
        return any(matches(f, event) for f in filter["any"])
    found = event
    for key in filter["path"]:
        if not isinstance(found, dict):
            return False
        found = found.get(key, _MISSING)
        if found is _MISSING:
            return False
    op, value = filter["op"], filter["value"]
    if op == "==":
        return bool(found == value)
    if op == "!=":
        return bool(found != value)
    return _contains(found, value)


def _contains(container: Any, value: Any) -> bool:
    if isinstance(container, dict):
        return isinstance(value, Hashable) and value in container
    if isinstance(container, list | tuple):
        return value in container
    return isinstance(container, str) and isinstance(value, str) and value in container


def filter_problems(node: Any, at: str = "filter") -> list[str]:
    """What is wrong with a native filter, one line per problem with its key path (empty when valid)."""
    if not isinstance(node, dict):
        return [f"{at}: expected a mapping with all:, any:, or path:, op: and value:"]
    for key in ("all", "any"):
        if key in node:
            if set(node) != {key} or not isinstance(node[key], list):
                return [f"{at}: '{key}' must be the only key and hold a list"]
            return [p for i, sub in enumerate(node[key]) for p in filter_problems(sub, f"{at}.{key}[{i}]")]
    problems = [f"{at}.{k}: unknown key" for k in node if k not in ("path", "op", "value")]
    path = node.get("path")
    if not isinstance(path, list) or not path or not all(isinstance(k, str) for k in path):
        problems.append(f"{at}.path: expected a non-empty list of keys (got {path!r})")
    if node.get("op") not in OPS:
        problems.append(f"{at}.op: expected one of {', '.join(OPS)} (got {node.get('op')!r})")
    if "value" not in node or not isinstance(node["value"], str | int | float | bool | None):
        problems.append(f"{at}.value: expected a string, number, boolean or null")
    return problems
