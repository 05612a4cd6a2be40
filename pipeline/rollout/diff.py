"""What two replays of one capture differ in, and the report `pipeline replay` prints.

Two results of one message are the same when they are of the same kind and: both published the same payload on
the same topic; or both are error records with the same reason, error and topic (their message id and attempt
are not compared); or both published nothing. A message whose results differ is counted once, under its key (the
rule's `key:` value when it has one, else its topic) and under each top-level JSON field whose value differs
(`(payload)` when either payload is not a JSON object, `(kind)` when one side published and the other did not).
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

import orjson

from pipeline.wire import frames
from pipeline.wire.frames import Result

if TYPE_CHECKING:
    from pipeline.rollout.capture import Record
    from pipeline.rollout.replay import Outcome

KINDS = {frames.PUBLISH: "publish", frames.ERROR: "error", frames.NOTHING: "nothing"}
EXAMPLES = 5  # differing messages shown in the report
SHOWN = 200  # characters of a payload shown in an example


def _json(payload: bytes) -> Any:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None


def _comparable(r: Result) -> tuple[Any, ...]:
    if r.kind == frames.ERROR:
        rec = _json(r.payload)
        if isinstance(rec, dict):
            return r.kind, r.topic, rec.get("reason"), rec.get("error")
    return r.kind, r.topic, r.payload


def fields(a: Result, b: Result) -> list[str]:
    """The top-level fields whose values differ between two differing results."""
    if a.kind != b.kind:
        return ["(kind)"]
    if a.topic != b.topic:
        return ["(topic)"]
    x, y = _json(a.payload), _json(b.payload)
    if a.kind == frames.ERROR and isinstance(x, dict) and isinstance(y, dict):
        return [f for f in ("reason", "error") if x.get(f) != y.get(f)]
    if not isinstance(x, dict) or not isinstance(y, dict):
        return ["(payload)"]
    return sorted(k for k in x.keys() | y.keys() if x.get(k, ...) != y.get(k, ...)) or ["(payload)"]


def side(o: Outcome, given: str) -> dict[str, Any]:
    """One version's figures: what it published, its errors by reason, timeouts, call latency percentiles."""
    kinds = Counter(KINDS[r.kind] for r in o.results)
    reasons: Counter[str] = Counter()
    for r in o.results:
        if r.kind == frames.ERROR:
            rec = _json(r.payload)
            reasons[rec.get("reason", "?") if isinstance(rec, dict) else "?"] += 1
    calls = sorted(r.latency for r in o.results if r.latency > 0)
    return {"model": given, "sha256": o.sha256, "published": kinds["publish"], "nothing": kinds["nothing"],
            "errors": dict(sorted(reasons.items())), "timeouts": reasons["timeout"], "restarts": o.restarts,
            "latency_ms": {"p50": _quantile(calls, 0.50), "p99": _quantile(calls, 0.99)},
            "seconds": round(o.seconds, 3), "rate_per_s": round(len(o.results) / o.seconds, 1) if o.seconds else None}


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 3)


def compare(records: list[Record], keys_of: list[str], new: Outcome, current: Outcome) -> dict[str, Any]:
    """The differing messages of two outcomes of `records` (`keys_of[i]`: the key of message i)."""
    by_key: Counter[str] = Counter()
    by_field: Counter[str] = Counter()
    examples = []
    for i, (a, b) in enumerate(zip(new.results, current.results, strict=True)):
        if _comparable(a) == _comparable(b):
            continue
        by_key[keys_of[i]] += 1
        by_field.update(fields(a, b))
        if len(examples) < EXAMPLES:
            examples.append({"index": i, "topic": records[i].topic, "new": _shown(a), "current": _shown(b)})
    differ = sum(by_key.values())
    return {"messages": differ, "percent": round(100 * differ / len(records), 3) if records else 0.0,
            "by_key": dict(by_key.most_common()), "by_field": dict(by_field.most_common()), "examples": examples}


def _shown(r: Result) -> dict[str, str]:
    text = r.payload.decode("utf-8", "replace")
    return {"kind": KINDS[r.kind], "topic": r.topic, "payload": text[:SHOWN] + ("..." if len(text) > SHOWN else "")}


def over(differ: int, total: int, limit: str) -> bool:
    """Whether `differ` of `total` messages passes `--max-diff` (`N` messages or `P%` of them)."""
    if limit.endswith("%"):
        return differ * 100 > float(limit[:-1]) * total
    return differ > int(limit)


def limit_problem(limit: str) -> str | None:
    """Why a --max-diff value is refused, or None."""
    try:
        value = float(limit[:-1]) if limit.endswith("%") else int(limit)
    except ValueError:
        return f"--max-diff is N (messages) or P% (of the messages), got {limit!r}"
    return None if value >= 0 else f"--max-diff must not be negative (got {limit!r})"


def text(report: dict[str, Any]) -> str:
    """The report as an operator reads it."""
    out = [f"capture {report['capture']}: rule {report['rule']}, {report['messages']} messages, "
           f"speed {report['speed']}"]
    for label, s in report["sides"].items():
        lat = s["latency_ms"]
        errors = ", ".join(f"{k} {v}" for k, v in s["errors"].items()) or "none"
        out.append(f"  {label:<8} {s['model']} (sha256 {s['sha256'][:12]}): published {s['published']}, nothing "
                   f"{s['nothing']}, errors {errors}; timeouts {s['timeouts']}, worker restarts {s['restarts']}; "
                   f"call p50 {lat['p50']} ms, p99 {lat['p99']} ms; {s['seconds']} s")
    d = report.get("diff")
    if d is None:
        return "\n".join(out)
    out.append(f"differ: {d['messages']} of {report['messages']} messages ({d['percent']}%); "
               f"max-diff {report['max_diff']}: {'PASS' if report['passed'] else 'FAIL'}")
    if d["messages"]:
        out.append("  by key:   " + ", ".join(f"{k} {n}" for k, n in list(d["by_key"].items())[:10]))
        out.append("  by field: " + ", ".join(f"{k} {n}" for k, n in list(d["by_field"].items())[:10]))
        for e in d["examples"]:
            out.append(f"  #{e['index']} {e['topic']}: new {e['new']['kind']} {e['new']['payload']} | current "
                       f"{e['current']['kind']} {e['current']['payload']}")
    return "\n".join(out)
