"""A func's device selection, in the shape each version of the old format writes it, as a native filter.

A selection is a list of devices; a device is `{"all": [conditions]}` (pipeline.models.filters); a func's filter is
`{"any": devices}` (one device: that device; none: `NOTHING`). Expressions are parsed, never evaluated.

- version 1: the func's `deviceName` (the message's `deviceInfo.deviceName` equals it) and `pointName` (a key of
  `telemetry`; empty: any point); no deviceName: no device.
- version 2: `device[]` entries, each `'<deviceName>' <deviceParseExpression>` and
  `'<pointName>' <pointParseExpression>`; all four keys are required (the old runtime failed without them).
- version 3: `devices[]` entries, each a non-empty `deviceAttr[]` of `'<attrValue>' <attrExpression>` tests.

In versions 2 and 3 the old runtime quoted the value, so it is compared as the text it printed as.
"""

from __future__ import annotations

from typing import Any

from pipeline.config.pyboot.keys import ATTR_V3, DEVICE_V2, DEVICE_V3, Report, scan
from pipeline.models.filters import parse_expression

NOTHING: dict[str, Any] = {"any": []}  # matches no message: what a func without devices processed
_V2_PAIRS = (("deviceName", "deviceParseExpression"), ("pointName", "pointParseExpression"))


def as_filter(devices: list[dict[str, Any]]) -> dict[str, Any]:
    """The native filter of a selection."""
    if not devices:
        return NOTHING
    return devices[0] if len(devices) == 1 else {"any": devices}


def selection(func: dict[str, Any], version: int, at: str, report: Report) -> list[dict[str, Any]]:
    """The devices a func selects (see the module docstring); problems and warnings go to `report`."""
    if version == 1:
        return _v1(func, at, report)
    key = "device" if version == 2 else "devices"
    entries = func.get(key)
    if entries in (None, []):
        return []
    if not isinstance(entries, list):
        report.problems.append(f"{at}.{key}: expected a list of devices (got {entries!r:.200})")
        return []
    read = _v2_device if version == 2 else _v3_device
    devices = [read(entry, f"{at}.{key}[{k}]", report) for k, entry in enumerate(entries)]
    return [d for d in devices if d is not None]


def _v1(func: dict[str, Any], at: str, report: Report) -> list[dict[str, Any]]:
    name, point = func.get("deviceName"), func.get("pointName")
    for key, value in (("deviceName", name), ("pointName", point)):
        if value is not None and not isinstance(value, str | int | float):
            report.problems.append(f"{at}.{key}: expected a name (got {value!r:.200})")
            return []
    if name in (None, ""):
        return []
    conditions = [{"path": ["deviceInfo", "deviceName"], "op": "==", "value": name}]
    if point not in (None, ""):
        conditions.append({"path": ["telemetry"], "op": "contains", "value": str(point)})
    return [{"all": conditions}]


def _v2_device(entry: Any, at: str, report: Report) -> dict[str, Any] | None:
    if not isinstance(entry, dict):
        report.problems.append(f"{at}: expected a mapping with {', '.join(DEVICE_V2)} (got {entry!r:.200})")
        return None
    scan(entry, DEVICE_V2, at, report)
    before = len(report.problems)
    conditions = [_test(entry, value_key, expr_key, at, report) for value_key, expr_key in _V2_PAIRS]
    return {"all": conditions} if len(report.problems) == before else None


def _v3_device(entry: Any, at: str, report: Report) -> dict[str, Any] | None:
    if isinstance(entry, dict):
        scan(entry, DEVICE_V3, at, report)
    attrs = entry.get("deviceAttr") if isinstance(entry, dict) else None
    if not isinstance(attrs, list) or not attrs:
        report.problems.append(f"{at}.deviceAttr: expected a non-empty list of {{attrName, attrValue, "
                               f"attrExpression}} (got {attrs!r:.200})")
        return None
    before = len(report.problems)
    conditions = []
    for m, attr in enumerate(attrs):
        where = f"{at}.deviceAttr[{m}]"
        if not isinstance(attr, dict):
            report.problems.append(f"{where}: expected a mapping with {', '.join(ATTR_V3)} (got {attr!r:.200})")
            continue
        scan(attr, ATTR_V3, where, report)
        conditions.append(_test(attr, "attrValue", "attrExpression", where, report))
    if len(report.problems) > before:
        return None
    if len(attrs) > 1:
        last = attrs[-1]
        report.warnings.append(
            f"{at}.deviceAttr: {len(attrs)} tests; the old runtime applied only the last one "
            f"('{last['attrValue']}' {last['attrExpression']}), here all of them must hold: a message that "
            "passes only the last one is no longer processed")
    return {"all": conditions}


def _test(entry: dict[str, Any], value_key: str, expr_key: str, at: str, report: Report) -> dict[str, Any]:
    """The condition `'<entry[value_key]>' <entry[expr_key]>`; a problem (and {}) when it is not accepted."""
    missing = [k for k in (value_key, expr_key) if entry.get(k) is None]
    if missing:
        report.problems.append(f"{at}: {' and '.join(missing)} missing (a test needs {value_key} and {expr_key})")
        return {}
    value = entry[value_key]
    if not isinstance(value, str | int | float):
        report.problems.append(f"{at}.{value_key}: expected a name or a number (got {value!r:.200})")
        return {}
    if isinstance(value, str) and any(c in value for c in "'\\\n"):
        report.warnings.append(f"{at}.{value_key}: {value!r:.80} holds a quote, a backslash or a line break: the old "
                               "runtime evaluated it in quotes, so it never matched (or read escapes); here it is "
                               "compared as written")
    try:
        return parse_expression(entry[expr_key], str(value))
    except ValueError as e:
        report.problems.append(f"{at}.{expr_key}: {e}")
        return {}


def overlapping(devices: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """Pairs (a, b), a < b, of devices that one message can both match: nothing tells them apart by an `==`
    condition on the same field with another value."""
    equal = [{tuple(c["path"]): c["value"] for c in d["all"] if c["op"] == "=="} for d in devices]
    pairs = []
    for a in range(len(devices)):
        for b in range(a + 1, len(devices)):
            shared = equal[a].keys() & equal[b].keys()
            if all(equal[a][p] == equal[b][p] for p in shared):
                pairs.append((a, b))
    return pairs
