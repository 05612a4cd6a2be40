"""Arithmetic over process snapshots: exact sums, rates, merged histograms, interpolated percentiles.

A process snapshot is the dict a stage's `telemetry.reporter.Reporter` publishes (`telemetry.schema.Snapshot`),
plus `alive` (the board's verdict) and, when the board holds an older snapshot of the same process from the last
few seconds, `prev` (`{"time", "counters", "histograms"}` of that older snapshot).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pipeline.telemetry.reporter import BUCKETS

Proc = dict[str, Any]  # a telemetry.schema.Snapshot, plus `alive` and `prev` from the board


def total(procs: Iterable[Proc], key: str) -> int:
    """Exact sum of a counter over every process, dead ones included (their counts stay)."""
    return sum(p.get("counters", {}).get(key, 0) for p in procs)


def level(procs: Iterable[Proc], key: str) -> int | None:
    """Sum of a level (a top-level field, such as ingress's `depth`) reported by live processes; None if none does."""
    found = []
    for p in procs:
        value = p.get(key) if p["alive"] else None
        if value is not None:
            found.append(value)
    return sum(found) if found else None


def counters(procs: Iterable[Proc]) -> dict[str, int]:
    """Every counter summed over processes, sorted by name."""
    out: dict[str, int] = {}
    for p in procs:
        for k, v in p.get("counters", {}).items():
            out[k] = out.get(k, 0) + v
    return dict(sorted(out.items()))


def rate(procs: Iterable[Proc], *keys: str) -> float:
    """Per-second growth of the counters `keys` over the last few seconds, summed over live processes."""
    per_s = 0.0
    for p in procs:
        prev = p.get("prev")
        if not p["alive"] or not prev:
            continue
        dt = p["time"] - prev["time"]
        if dt > 0:
            grown = sum(p["counters"].get(k, 0) - prev["counters"].get(k, 0) for k in keys)
            per_s += max(0, grown) / dt
    return round(per_s, 1)


def add(into: list[int], counts: list[int]) -> list[int]:
    """Element-wise sum of two bucket-count lists (the shorter one padded with zeros)."""
    if len(into) < len(counts):
        into = into + [0] * (len(counts) - len(into))
    return [a + (counts[i] if i < len(counts) else 0) for i, a in enumerate(into)]


def histogram(procs: Iterable[Proc], name: str) -> list[int]:
    """Bucket counts of histogram `name` summed over every process (dead ones included)."""
    out: list[int] = []
    for p in procs:
        h = p.get("histograms", {}).get(name)
        if h:
            out = add(out, h)
    return out


def histogram_sum(procs: Iterable[Proc], name: str) -> float | None:
    """Total seconds observed by histogram `name` (snapshot field `sums`), or None when any process holding
    that histogram does not report its sum."""
    out = 0.0
    for p in procs:
        if p.get("histograms", {}).get(name):
            s = p.get("sums", {}).get(name)
            if s is None:
                return None
            out += s
    return out


def recent(procs: Iterable[Proc], name: str) -> list[int]:
    """Bucket counts of `name` observed over the last few seconds by live processes."""
    out: list[int] = []
    for p in procs:
        prev = p.get("prev")
        h = p.get("histograms", {}).get(name)
        if p["alive"] and prev and h:
            before = prev.get("histograms", {}).get(name) or []
            out = add(out, [max(0, a - (before[i] if i < len(before) else 0)) for i, a in enumerate(h)])
    return out


def quantile(counts: list[int], q: float) -> float | None:
    """The q-quantile (seconds) of bucket counts, interpolated linearly inside its bucket as Prometheus's
    histogram_quantile does; a quantile in the +Inf bucket is the last finite bound. None when empty."""
    n = sum(counts)
    if n == 0:
        return None
    rank, seen = q * n, 0
    for i, c in enumerate(counts):
        if c and seen + c >= rank:
            if i >= len(BUCKETS):
                return BUCKETS[-1]
            lower = BUCKETS[i - 1] if i else 0.0
            return lower + (BUCKETS[i] - lower) * (rank - seen) / c
        seen += c
    return BUCKETS[-1]


def latency_ms(procs: list[Proc], name: str) -> dict[str, float | None]:
    """p50 and p99 (milliseconds) of histogram `name`: over the last few seconds when anything was observed
    then, else over the whole life of the processes (an idle stage keeps showing its last known latency)."""
    counts = recent(procs, name)
    if not sum(counts):
        counts = histogram(procs, name)
    out: dict[str, float | None] = {}
    for label, q in (("p50", 0.5), ("p99", 0.99)):
        v = quantile(counts, q)
        out[label] = None if v is None else round(v * 1000, 3)
    return out
