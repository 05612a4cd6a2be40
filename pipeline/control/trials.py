"""The `trials` part of GET /models: each shadow and canary, its two versions side by side (what the dashboard
shows while one runs).

Pure functions of the configuration, the stage snapshots and the canaries' verdicts (pipeline.trials, read from the
run directory). A version's figures come from its rule's workers over their life: results (model outputs and error
records), error rate, p50/p99 of the model call (recent when anything was observed recently). A shadow's agreement
comes from egress's counters; a canary's window figures from egress's `canaries` gauge while it runs, and from
its verdict once there is one.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import trials as verdicts
from pipeline.telemetry import aggregation
from pipeline.telemetry.aggregation import Proc

if TYPE_CHECKING:  # pipeline.config.load loads pydantic; a stage gets its config from pipeline.config.snapshot
    from pipeline.config.load import Config, Rule


def _version(rule: Rule, procs: list[Proc]) -> dict[str, Any]:
    ws = [p for p in procs if p["stage"] == "rule" and p.get("rule") == rule.name]
    processed, errors = aggregation.total(ws, "processed"), aggregation.total(ws, "errors")
    results = processed + errors
    return {"rule": rule.name, "model": rule.model, "workers_alive": sum(bool(p["alive"]) for p in ws),
            "results": results, "errors": errors, "error_rate": errors / results if results else None,
            "latency_ms": aggregation.latency_ms(ws, "call"),
            "rate_per_s": aggregation.rate(ws, "processed", "errors")}


def _shadow(live: Rule, procs: list[Proc]) -> dict[str, Any]:
    egress = [p for p in procs if p["stage"] == "egress"]
    ingress = [p for p in procs if p["stage"] == "ingress"]
    compared = aggregation.total(egress, f"shadow_compared.{live.name}")
    agreed = aggregation.total(egress, f"shadow_agreed.{live.name}")
    return {"percent": live.shadow.percent, "compared": compared, "agreed": agreed,
            "agreement_rate": agreed / compared if compared else None,
            "unmatched": aggregation.total(egress, f"shadow_unmatched.{live.name}"),
            "dropped": aggregation.total(ingress, f"dropped.{live.name}~shadow")}


def _canary(live: Rule, procs: list[Proc], run_dir: Path | None) -> dict[str, Any]:
    spec = live.canary
    verdict = verdicts.read_verdict(run_dir, live.name) if run_dir is not None else None
    egress = [p for p in procs if p["stage"] == "egress"]
    running = [p["canaries"][live.name] for p in egress if p["alive"] and live.name in (p.get("canaries") or {})]
    state = str(verdict.get("state", "unknown")) if verdict else "running"  # the file is read, not trusted
    serving = {"running": spec.percent, verdicts.PROMOTED: 100.0}.get(state, 0.0)
    return {"percent": spec.percent, "serving_percent": serving, "state": state,
            "reason": verdict.get("reason") if verdict else None, "decided_at": verdict.get("at") if verdict else None,
            "window_s": spec.window, "max_error_rate": spec.max_error_rate, "max_p99_s": spec.max_p99,
            "then": spec.then, "window": verdict.get("window") if verdict else (running[-1] if running else None),
            "rollbacks": aggregation.total(egress, f"canary_{verdicts.ROLLED_BACK}.{live.name}")}


def trials(cfg: Config, procs: list[Proc], run_dir: Path | None) -> list[dict[str, Any]]:
    """Every shadow and canary of the configuration: kind, rule, the live and candidate versions, and what is
    particular to the kind (a shadow's agreement, a canary's state and window)."""
    out = []
    for r in cfg.rules:
        if r.trial is None:
            continue
        live = cfg.rule(r.trial_of)
        doc = {"kind": r.trial, "rule": live.name, "live": _version(live, procs), "candidate": _version(r, procs)}
        doc.update(_shadow(live, procs) if r.trial == "shadow" else _canary(live, procs, run_dir))
        out.append(doc)
    return out
