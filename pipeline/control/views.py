"""Turning per-process snapshots into per-stage documents: GET /stages (which /readyz reads through
`pipeline.telemetry.readiness`) and /queue_size_metrics.

Pure functions of the configuration and the board's process list (see `pipeline.telemetry.aggregation` for the
arithmetic). Counts sum every process of a stage, dead ones included, so restarts lose nothing; levels (queues, what
is in flight, broker states) and rates come from live processes only.

Where a message waits, and so which stage's `depth` it adds to:
- ingress: its own intake queue (snapshot field `depth`, less what it holds per rule, below);
- a rule: what ingress holds for the rule and has not given to a worker (`rules.<rule>.pending`, when
  ingress keeps per-rule queues) plus what the rule's workers were given and did not finish (`in_flight`:
  ingress's `rules.<rule>.at_workers` when reported, else dispatched.<rule> - processed - errors, less the
  copies ingress took back from dead workers: redispatched.<rule> + dead_letters.<rule>);
- egress: results sent to it and not taken yet (what workers finished, plus ingress's dead letters, less
  egress's `received`) plus the rows of its outbox (`outbox.rows`, when reported).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from pipeline.telemetry import aggregation
from pipeline.telemetry.aggregation import Proc
from pipeline.telemetry.schema import OutboxLevels

if TYPE_CHECKING:  # pipeline.config.load loads pydantic; a stage gets its config from pipeline.config.snapshot
    from pipeline.config.load import Config, Rule


class Groups:
    """The processes of a stack sorted by stage, and ingress's per-rule queues summed over its live processes."""

    def __init__(self, procs: list[Proc]) -> None:
        self.ingress = [p for p in procs if p["stage"] == "ingress"]
        self.egress = [p for p in procs if p["stage"] == "egress"]
        self.workers = [p for p in procs if p["stage"] == "rule"]
        self.queues: dict[str, dict[str, int]] = {}  # RuleQueueLevels of every live ingress, summed
        for p in self.ingress:
            if not p["alive"]:
                continue
            for rule, q in (p.get("rules") or {}).items():
                into = self.queues.setdefault(rule, {})
                for k, v in q.items():
                    into[k] = into.get(k, 0) + v

    def rule(self, name: str) -> list[Proc]:
        return [p for p in self.workers if p.get("rule") == name]


def _brokers(procs: list[Proc]) -> dict[str, str]:
    live = [p for p in procs if p["alive"]]
    if not live:
        return {}
    return dict(max(live, key=lambda p: p["time"]).get("brokers") or {})


def _done(procs: list[Proc]) -> int:
    """Messages that left a rule's workers: one result each, a model output or an error record."""
    return aggregation.total(procs, "processed") + aggregation.total(procs, "errors")


def _at_workers(rule: str, g: Groups) -> int:
    """Messages given to the rule's workers and not finished."""
    reported = g.queues.get(rule, {}).get("at_workers")
    if reported is not None:
        return reported
    taken_back = (aggregation.total(g.ingress, f"redispatched.{rule}")
                  + aggregation.total(g.ingress, f"dead_letters.{rule}"))
    return max(0, aggregation.total(g.ingress, f"dispatched.{rule}") - _done(g.rule(rule)) - taken_back)


def _depth(rule: str, g: Groups) -> int:
    return g.queues.get(rule, {}).get("pending", 0) + _at_workers(rule, g)


def _ingress(cfg: Config, g: Groups) -> dict[str, Any]:
    ing = g.ingress
    held = sum(q.get("pending", 0) for q in g.queues.values())
    unacked = [sum((p.get("unacked") or {}).values()) for p in ing if p["alive"] and "unacked" in p]
    return {
        "name": "ingress",
        "up": any(p["alive"] for p in ing),
        "received": aggregation.total(ing, "received"),
        "dispatched": sum(aggregation.total(ing, f"dispatched.{r.name}") for r in cfg.rules),
        "unrouted": aggregation.total(ing, "unrouted"),
        "depth": max(0, (aggregation.level(ing, "depth") or 0) - held),
        "in_flight": sum(unacked) if unacked else None,  # not yet acknowledged to the brokers
        "rate_per_s": aggregation.rate(ing, "received"),
        "brokers": _brokers(ing),
        "counters": aggregation.counters(ing),
    }


def _rule(rule: Rule, g: Groups) -> dict[str, Any]:
    ws, name = g.rule(rule.name), rule.name
    alive = sum(bool(p["alive"]) for p in ws)
    return {
        "name": f"rule:{name}",
        "trial": rule.trial,  # a shadow's or canary's companion: its kind and the rule it tries a candidate for
        "trial_of": rule.trial_of,
        "up": alive > 0,
        "workers": rule.workers,
        "workers_alive": alive,
        "received": aggregation.total(ws, "received"),
        "processed": aggregation.total(ws, "processed"),
        "errors": aggregation.total(ws, "errors"),
        "dropped": aggregation.total(g.ingress, f"dropped.{name}"),
        "dead_letters": aggregation.total(g.ingress, f"dead_letters.{name}"),
        "depth": _depth(name, g),
        "in_flight": _at_workers(name, g),
        "latency_ms": aggregation.latency_ms(ws, "call"),
        "end_to_end_ms": aggregation.latency_ms(g.egress, f"end_to_end.{name}"),
        "rate_per_s": aggregation.rate(ws, "processed", "errors"),
        "counters": aggregation.counters(ws),
    }


def _outbox(g: Groups) -> OutboxLevels | None:
    live = [p["outbox"] for p in g.egress if p["alive"] and isinstance(p.get("outbox"), dict)]
    return live[-1] if live else None


def _in_transit(cfg: Config, g: Groups) -> int:
    """Results on their way to egress, or in it before its outbox commit. From ingress's own count of the
    QoS 1 messages answered and not confirmed when it reports one (a level: exact after any process was
    killed); else from counters (what workers and ingress made minus what egress took), which lose the last
    half second of a process killed with SIGKILL."""
    answered = [g.queues[r.name].get("answered") for r in cfg.rules if r.name in g.queues]
    if answered and None not in answered and len(answered) == len(cfg.rules):
        return sum(answered)
    entered = _done(g.workers) + sum(aggregation.total(g.ingress, f"dead_letters.{r.name}") for r in cfg.rules)
    return max(0, entered - aggregation.total(g.egress, "received"))


def _egress(cfg: Config, g: Groups) -> dict[str, Any]:
    egr, outbox = g.egress, _outbox(g)
    doc = {
        "name": "egress",
        "up": any(p["alive"] for p in egr),
        "received": aggregation.total(egr, "received"),
        "published": aggregation.total(egr, "published"),
        "error_records": aggregation.total(egr, "error_records"),
        "dropped": aggregation.total(egr, "dropped"),
        "depth": _in_transit(cfg, g) + int((outbox or {}).get("rows", 0)),
        "rate_per_s": aggregation.rate(egr, "received"),
        "brokers": _brokers(egr),
        "counters": aggregation.counters(egr),
    }
    if outbox is not None:
        doc["outbox"] = outbox
    return doc


def stages(cfg: Config, procs: list[Proc]) -> dict[str, Any]:
    """The GET /stages document: ingress, one entry per rule, egress, in data-flow order."""
    g = Groups(procs)
    return {"time": time.time(),
            "stages": [_ingress(cfg, g), *(_rule(r, g) for r in cfg.rules), _egress(cfg, g)]}


def egress_depth(rule: str, g: Groups, egress_total: int) -> int:
    """Results of `rule` in egress, plus the outbox's rows (of every rule: the outbox does not tell them per rule),
    within egress's whole depth. Results in transit come from ingress's `answered` level; without a live ingress,
    from counters (or, when egress does not count `received.<rule>`, its end-to-end histogram)."""
    answered = g.queues.get(rule, {}).get("answered")
    if answered is None:
        made = _done(g.rule(rule)) + aggregation.total(g.ingress, f"dead_letters.{rule}")
        key = f"received.{rule}"
        if any(key in p.get("counters", {}) for p in g.egress):
            taken = aggregation.total(g.egress, key)
        else:
            taken = sum(aggregation.histogram(g.egress, f"end_to_end.{rule}"))
        answered = max(0, made - taken)
    outbox = _outbox(g) or {}
    return min(egress_total, answered + int(outbox.get("rows", 0)))


def queue_size_metrics(cfg: Config, procs: list[Proc]) -> dict[str, Any]:
    """The old runtime's shape: per rule, pre_queue = the rule's depth, post_queue = its results in egress."""
    g = Groups(procs)
    egress_total = _egress(cfg, g)["depth"]
    return {"queue_size_metrics": [
        {"sub_process_name": r.name, "pre_queue": _depth(r.name, g),
         "post_queue": egress_depth(r.name, g, egress_total)}
        for r in cfg.rules]}
