"""Egress's part of shadows and canaries (see pipeline.trials): it sees every result, so it measures how often a
shadow's outputs equal the live rule's, and judges each canary over its window.

Counters (per live rule): `shadow_compared.<rule>`, `shadow_agreed.<rule>`, `shadow_unmatched.<rule>` (a message
whose other version's result never came while it was remembered), `canary_<verdict>.<rule>`. The snapshot's
`canaries` gauge holds each running canary's window figures.

Invariant: judging never delays a result: a verdict is written to the run directory (ingress acts on it), and the
results go on exactly as before it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import trials
from pipeline.config.schema.behaviour import CANARY, SHADOW
from pipeline.telemetry.reporter import Reporter
from pipeline.wire import frames
from pipeline.wire.frames import Result

if TYPE_CHECKING:  # pipeline.config.load loads pydantic; a stage gets its config from pipeline.config.snapshot
    from pipeline.config.load import Config

log = logging.getLogger("pipeline.egress.trials")  # a stable name for log filters, not the module path

JUDGE_EVERY = 0.25  # seconds between two judgements of the canaries


class Trials:
    """The shadows' agreement and the canaries' judges of a stack."""

    def __init__(self, cfg: Config, run_dir: Path, stats: Reporter) -> None:
        self.run_dir, self.stats = run_dir, stats
        self.shadow_of = {r.name: r.trial_of for r in cfg.rules if r.trial == SHADOW}  # shadow -> live rule
        shadowed = set(self.shadow_of.values())  # a live result is the live rule's, or its canary's
        self.live_of = {r.name: r.trial_of or r.name for r in cfg.rules
                        if (r.trial_of or r.name) in shadowed and r.trial != SHADOW}
        self.percent = {live: cfg.rule(live).shadow.percent for live in shadowed}  # messages its shadow gets
        self.judges = {r.name: trials.CanaryJudge(r.trial_of, cfg.rule(r.trial_of).canary)
                       for r in cfg.rules if r.trial == CANARY and trials.read_verdict(run_dir, r.trial_of) is None}
        self.agreement = trials.Agreement()
        self.judge_at = 0.0
        if self.judges:
            stats.gauges["canaries"] = self._figures

    def see(self, r: Result, now: float) -> None:
        """One result, as a worker (or ingress, for an error record of its own) made it."""
        judge = self.judges.get(r.rule)
        if judge is not None:
            judge.add(now, r.latency, r.kind == frames.ERROR)
        shadow = r.rule in self.shadow_of
        live = self.shadow_of[r.rule] if shadow else self.live_of.get(r.rule)
        if live is None or not (shadow or trials.sampled(r.message_id, self.percent[live])):
            return  # not a trial's, or a message its shadow does not get
        output = (r.kind, hashlib.blake2b(r.payload, digest_size=16).digest() if r.kind == frames.PUBLISH else b"")
        agreed = self.agreement.match(live, r.message_id, shadow, output)
        if agreed is not None:
            self.stats.count(f"shadow_compared.{live}")
            if agreed:
                self.stats.count(f"shadow_agreed.{live}")
        for gone in self.agreement.overflow():
            self.stats.count(f"shadow_unmatched.{gone}")

    def tick(self, now: float) -> None:
        """Judge the canaries; a verdict is recorded for ingress (and control), logged and counted."""
        if not self.judges or now < self.judge_at:
            return
        self.judge_at = now + JUDGE_EVERY
        for name, judge in list(self.judges.items()):
            verdict = judge.verdict or judge.judge(now)  # one reached and not yet written, or the window's
            if verdict is None:
                continue
            try:
                trials.write_verdict(self.run_dir, verdict)
            except OSError as e:  # a full disk, a file in the way: ingress acts once it is written (tried again)
                self.stats.reject("canary_verdict_unwritten", f"the verdict on rule {judge.rule}'s canary: {e}")
                continue
            del self.judges[name]
            self.stats.count(f"canary_{verdict['state']}.{judge.rule}")
            level = logging.WARNING if verdict["state"] == trials.ROLLED_BACK else logging.INFO
            log.log(level, "canary %s of rule %s %s: %s", verdict["model"], judge.rule, verdict["state"],
                    verdict["reason"])

    def _figures(self) -> dict[str, Any]:
        now = time.monotonic()
        return {j.rule: j.figures(now) for j in self.judges.values()}
