"""Ingress's part of shadows and canaries (see pipeline.trials): which queue serves a message of a rule with a
canary, copies for a shadow, and acting on a canary's verdict.

Invariants:
- a message of a rule with a canary goes to exactly one of the live and the candidate queue, and its ack waits for
  the live rule's name whichever serves it (`Ingress.ack_as`), so a message moved between them is acked once;
- after a rollback (or an ended canary) no message goes to the candidate: what waits for it (its backlog, and what
  its workers give back when they die) is moved to the live queue as it is, attempt kept; what its workers hold
  is answered by them (one result each, at QoS 1 confirmed once), so nothing is lost or published twice;
- a shadow's copy is QoS 0 with no packet id: never tracked for an ack, dropped (counted) when its backlog is full,
  never sent again; the shadow gets `shadow.percent` of the rule's messages (every one by default).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline import trials
from pipeline.keyed import keys
from pipeline.models import codec
from pipeline.stages.ingress.dispatch import RuleQueue
from pipeline.stages.ingress.keyed import key_value
from pipeline.telemetry.reporter import Reporter
from pipeline.wire.frames import Message

log = logging.getLogger("pipeline.ingress.trials")  # a stable name for log filters, not the module path

VERDICT_EVERY = 0.2  # seconds between two looks for a canary's verdict


class ShadowFeed:
    """A rule's shadow queue and the share of the rule's messages it gets (`shadow.percent`): the messages whose id
    `trials.sampled` picks, which egress tells the same way."""

    def __init__(self, queue: RuleQueue, percent: float) -> None:
        self.queue, self.percent = queue, percent

    def copy(self, msg: Message) -> Message | None:
        """The copy of `msg` the shadow gets (best effort: QoS 0, never acknowledged on the shadow's behalf), or
        None when this one is not sampled."""
        if not trials.sampled(msg.id, self.percent):
            return None
        return msg._replace(rule=self.queue.rule.name, qos=0, mid=0, dup=False)


class CanaryRoute:
    """A rule with a canary: its live queue, the candidate's, and the share of keys the candidate serves (the
    canary's percent while it runs, 100 once promoted, 0 once rolled back or ended)."""

    def __init__(self, live: RuleQueue, candidate: RuleQueue, run_dir: Path, stats: Reporter) -> None:
        spec = live.rule.canary
        self.live, self.candidate, self.run_dir, self.stats = live, candidate, run_dir, stats
        self.parts = keys.parse(spec.key) if spec.key else None  # None: the input topic is the key
        self.share = spec.percent
        self.verdict: dict[str, Any] | None = None
        self.look_at = 0.0
        self._apply(trials.read_verdict(run_dir, live.rule.name))

    def serving(self, topic: str, payload: bytes, memo: list[Any]) -> RuleQueue:
        """The queue that serves a message (`memo`: its payload decoded, shared with keyed rules)."""
        if self.share <= 0:
            return self.live
        if self.share >= 100:
            return self.candidate
        key = self._key(topic, payload, memo)
        return self.candidate if key is not None and trials.key_share(key) < self.share else self.live

    def _key(self, topic: str, payload: bytes, memo: list[Any]) -> str | None:
        if self.parts is None:
            return topic
        try:
            return key_value(self.parts, topic, payload, memo)
        except (keys.NoKey, codec.BadPayload):
            return None  # no key: the live version serves it

    def tick(self, now: float) -> None:
        """Look for the verdict now and then; once the candidate serves nothing, hand what waits for it back."""
        if self.verdict is None and now >= self.look_at:
            self.look_at = now + VERDICT_EVERY
            self._apply(trials.read_verdict(self.run_dir, self.live.rule.name))
        if self.share <= 0 and self.candidate.backlogged:
            self._hand_back()

    def _apply(self, verdict: dict[str, Any] | None) -> None:
        if verdict is None:
            return
        self.verdict = verdict
        self.share = 100.0 if verdict.get("state") == trials.PROMOTED else 0.0
        log.warning("canary %s of rule %s %s: %s; it now serves %g%% of the keys", verdict.get("model"),
                    self.live.rule.name, verdict.get("state"), verdict.get("reason"), self.share)

    def _hand_back(self) -> None:
        """Move what waits for the candidate to the live queue, as it is (a suspect stays one)."""
        c, name = self.candidate, self.live.rule.name
        moved = [m._replace(rule=name) for m in c.pending]
        suspects = [m._replace(rule=name) for m in c.retry]
        c.pending.clear()
        c.retry.clear()
        self.live.pending.extendleft(reversed(moved))
        self.live.retry.extend(suspects)
        self.stats.count(f"canary_handed_back.{name}", len(moved) + len(suspects))
