"""Shadows and canaries: a candidate model tried beside a rule's live one (see README, "Shadow and canary").

Both run as companion rules of the configuration (`RuleMixin.trials`: `<rule>~shadow`, `<rule>~canary`) with
workers of their own. What is decided where:
- ingress routes: a copy of every message of the rule to its shadow (QoS 0, best effort: never acknowledged on its
  behalf, dropped and counted when its backlog is full), and the keys whose `key_share` is under the canary's
  share to the canary instead of the live rule;
- egress judges: it sees every result (kind and model call latency), so it measures a shadow's agreement with the
  live results (`Agreement`) and a canary's error rate and p99 over its window (`CanaryJudge`); a verdict is
  written to the run directory (`write_verdict`), where ingress reads it at its next tick and control for /models.

Invariants: a verdict is final for the run it names (a new `pipeline up` starts the trial again); a key's share
depends on the key only (CRC-32), so a key always sees the same version while the share stays put.
"""

from __future__ import annotations

import json
import math
import os
import time
import zlib
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config.snapshot import RUN
from pipeline.supervision import run_dir as rundir

ROLLED_BACK, PROMOTED, ENDED = "rolled_back", "promoted", "ended"  # a canary's verdicts
MIN_RESULTS = 10  # results in the window before a canary can be judged at all
MAX_WINDOW_RESULTS = 200_000  # results a judge keeps (the oldest go first past it)
AGREEMENT_PENDING = 10_000  # messages waiting for the other version's result (the oldest counted unmatched)
SCALE = 10_000  # key shares are compared in hundredths of a percent


def key_share(key: str) -> float:
    """Where `key` falls in [0, 100): a key is the candidate's while this is under the canary's percent."""
    return (zlib.crc32(key.encode("utf-8", "surrogatepass")) % SCALE) * 100.0 / SCALE


def sampled(msg_id: str, percent: float) -> bool:
    """Whether a shadow that gets `percent` of its rule's messages gets the message `msg_id`."""
    return percent >= 100 or key_share(msg_id) < percent


# -- verdicts --

def run_id() -> str:
    return os.environ.get(RUN, "")


def write_verdict(run_dir: Path, verdict: dict[str, Any]) -> None:
    """Record the verdict on a canary for this run (`verdict["rule"]`: the live rule)."""
    path = rundir.canary_verdict(run_dir, verdict["rule"])
    rundir.private_folder(path.parent)
    rundir.write_private(path, json.dumps({**verdict, "run": run_id()}))


def read_verdict(run_dir: Path, rule: str) -> dict[str, Any] | None:
    """The verdict on the canary of `rule` in this run, None while there is none (or it was another run's)."""
    verdict = rundir.read_object(rundir.canary_verdict(run_dir, rule))
    return verdict if verdict is not None and verdict.get("run") == run_id() else None


# -- judging a canary (egress) --

def p99(latencies: list[float]) -> float:
    ordered = sorted(latencies)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


@dataclass
class CanaryJudge:
    """The results of one canary over its window, and the verdict they call for. `spec`: the rule's `canary`."""

    rule: str
    spec: Any
    seen: deque[tuple[float, float, bool]] = field(default_factory=lambda: deque(maxlen=MAX_WINDOW_RESULTS))
    started: float | None = None  # monotonic time of its first result
    total: int = 0  # results since the first
    failed: int = 0  # error records among them
    verdict: dict[str, Any] | None = None

    def add(self, now: float, latency: float, error: bool) -> None:
        if self.started is None:
            self.started = now
        self.total += 1
        self.failed += error
        self.seen.append((now, latency, error))

    def figures(self, now: float) -> dict[str, Any]:
        """Results, errors, error rate and p99 (seconds) of the last window."""
        while self.seen and self.seen[0][0] < now - self.spec.window:
            self.seen.popleft()
        n = len(self.seen)
        errors = sum(1 for _, _, e in self.seen if e)
        return {"results": n, "errors": errors, "error_rate": errors / n if n else None,
                "p99_s": p99([lat for _, lat, _ in self.seen]) if n else None}

    def judge(self, now: float) -> dict[str, Any] | None:
        """The verdict the window calls for now (kept once reached), or None while the canary goes on: rolled back
        as soon as the last window holds MIN_RESULTS results or more and passes a limit; else, once a window has
        passed since its first result and it had MIN_RESULTS results in all, rolled back if the last window (however
        few its results) or every result since the first passes a limit, else what `then` says (a candidate too
        quiet to fill a window is never promoted past its limits)."""
        if self.verdict is not None or self.started is None:
            return None
        f = self.figures(now)
        held = now - self.started >= self.spec.window and self.total >= MIN_RESULTS
        reason = self._breach(f) if f["results"] >= MIN_RESULTS or (held and f["results"]) else None
        if reason is None and held and self.failed > self.spec.max_error_rate * self.total:
            reason = f"error rate {self.failed / self.total:.2%} over max_error_rate {self.spec.max_error_rate:.2%} " \
                     f"({self.failed} of {self.total} since its first result)"
        if reason is not None:
            return self._decide(ROLLED_BACK, reason, f)
        if held:
            held = f"held for {self.spec.window:g}s ({self.total} results)"
            return self._decide(PROMOTED if self.spec.then == "promote" else ENDED, held, f)
        return None

    def _breach(self, f: dict[str, Any]) -> str | None:
        s = self.spec
        if f["error_rate"] > s.max_error_rate:
            return f"error rate {f['error_rate']:.2%} over max_error_rate {s.max_error_rate:.2%} " \
                   f"({f['errors']} of {f['results']} in {s.window:g}s)"
        if s.max_p99 is not None and f["p99_s"] > s.max_p99:
            return f"p99 {f['p99_s'] * 1000:.1f}ms over max_p99 {s.max_p99 * 1000:g}ms ({f['results']} results)"
        return None

    def _decide(self, state: str, reason: str, f: dict[str, Any]) -> dict[str, Any]:
        self.verdict = {"rule": self.rule, "model": self.spec.model, "state": state, "reason": reason,
                        "at": time.time(), "window": f}
        return self.verdict


# -- a shadow's agreement (egress) --

class Agreement:
    """The first result of each message from the live rule and from its shadow, matched by message id: equal
    outputs agree (the same payload, both nothing, or both an error record). Bounded: past AGREEMENT_PENDING
    messages waiting for the other version, the oldest is forgotten and counted unmatched."""

    def __init__(self) -> None:
        self.pending: OrderedDict[tuple[str, str], tuple[bool, int, bytes]] = OrderedDict()

    def match(self, live: str, msg_id: str, shadow: bool, output: tuple[int, bytes]) -> bool | None:
        """The agreement of the two outputs of `msg_id` once both came (None until then, or for a second result of
        the same version); `output`: (kind, a digest of the payload: empty unless published; a waiting message holds
        its digest, not its payload, so the bound is one of memory too)."""
        key = (live, msg_id)
        first = self.pending.get(key)
        if first is None or first[0] == shadow:
            if first is None:
                self.pending[key] = (shadow, *output)
            return None
        del self.pending[key]
        return first[1:] == output

    def overflow(self) -> list[str]:
        """Forget the oldest waiting messages past the bound; the live rules they were of."""
        gone = []
        while len(self.pending) > AGREEMENT_PENDING:
            gone.append(self.pending.popitem(last=False)[0][0])
        return gone
