"""Turning per-process snapshots into the per-stage view of GET /stages (pure functions)."""

from __future__ import annotations

import time
from typing import Any

from pipeline.config import Config


def _sum(procs: list[dict[str, Any]], key: str) -> int:
    return sum(p["counters"].get(key, 0) for p in procs)


def _brokers(procs: list[dict[str, Any]]) -> dict[str, str]:
    live = [p for p in procs if p["alive"]]
    if not live:
        return {}
    return dict(max(live, key=lambda p: p["time"]).get("brokers", {}))


def stages(cfg: Config, procs: list[dict[str, Any]]) -> dict[str, Any]:
    """The GET /stages document: ingress, one entry per rule, egress, in data-flow order."""
    ing = [p for p in procs if p["stage"] == "ingress"]
    egr = [p for p in procs if p["stage"] == "egress"]
    out = [{
        "name": "ingress",
        "up": any(p["alive"] for p in ing),
        "received": _sum(ing, "received"),
        "dispatched": _sum(ing, "dispatched"),
        "unrouted": _sum(ing, "unrouted"),
        "depth": sum(p.get("depth", 0) for p in ing if p["alive"]),
        "brokers": _brokers(ing),
    }]
    for rule in cfg.rules:
        ws = [p for p in procs if p["stage"] == "rule" and p["rule"] == rule.name]
        received = _sum(ws, "received")
        alive = sum(p["alive"] for p in ws)
        out.append({
            "name": f"rule:{rule.name}",
            "up": alive > 0,
            "workers": rule.workers,
            "workers_alive": alive,
            "received": received,
            "processed": _sum(ws, "processed"),
            "errors": _sum(ws, "errors"),
            "depth": max(0, _sum(ing, f"dispatched.{rule.name}") - received),
        })
    out.append({
        "name": "egress",
        "up": any(p["alive"] for p in egr),
        "received": _sum(egr, "received"),
        "published": _sum(egr, "published"),
        "error_records": _sum(egr, "error_records"),
        "dropped": _sum(egr, "dropped"),
        "depth": max(0, sum(_sum(ws, "received") for ws in [[p for p in procs if p["stage"] == "rule"]])
                     - _sum(egr, "received")),
        "brokers": _brokers(egr),
    })
    return {"time": time.time(), "stages": out}


def not_ready(doc: dict[str, Any]) -> list[str]:
    """What keeps the stack from being ready: stages down, brokers not connected."""
    problems = []
    for st in doc["stages"]:
        if not st["up"]:
            problems.append(f"{st['name']} is down")
        for name, state in st.get("brokers", {}).items():
            if state != "connected":
                problems.append(f"{st['name']}: broker {name} is {state}")
    return problems
