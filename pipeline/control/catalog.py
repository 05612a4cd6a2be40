"""GET /rules and GET /models: what the stack is configured to run and what its workers actually loaded.

Nothing secret leaves here: broker passwords (and any credentials written into a broker url) and model
params (which may hold keys) are never included.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline.models.packages.sources import redact
from pipeline.telemetry.aggregation import Proc

if TYPE_CHECKING:  # pipeline.config.load loads pydantic; a stage gets its config from pipeline.config.snapshot
    from pipeline.config.load import Broker, Config, Rule


def _broker(name: str, b: Broker, procs: list[Proc]) -> dict[str, Any]:
    """A broker as configured, and the MQTT version each stage's link to it speaks (`protocol_in_use`: stage ->
    "5" or "3.1.1", from the newest live snapshot of each stage; a stage is missing until its link connected)."""
    in_use = {}
    for stage in ("ingress", "egress"):
        live = [p for p in procs if p["stage"] == stage and p.get("alive")]
        chosen = (max(live, key=lambda p: p.get("time") or 0.0).get("protocols") or {}).get(name) if live else None
        if chosen:
            in_use[stage] = chosen
    return {"url": redact(b.url), "username": b.username, "password_set": b.password is not None,
            "keepalive_s": b.keepalive, "protocol": b.protocol, "protocol_in_use": in_use}


def _keyed(r: Rule) -> dict[str, Any]:
    """A rule's key (the parts as configured), its default key and the bounds of its state; null when unkeyed."""
    bounds = {"max_bytes": int(r.state.max_bytes), "expire_after_s": r.state.expire_after} if r.key else None
    return {"key": r.key, "key_default": r.key_default, "state": bounds}


def rules(cfg: Config, procs: list[Proc]) -> dict[str, Any]:
    """The GET /rules document: every rule as configured (overrides applied; a keyed rule's key and state bounds),
    and the brokers they use, with the MQTT version ingress and egress chose (`procs`: the stage snapshots)."""
    out = []
    for r in cfg.rules:
        out.append({
            "name": r.name,
            "sub": {"broker": r.sub.broker, "topic": r.sub.topic, "qos": r.sub.qos},
            "model": r.model,
            "pub": {"broker": r.pub.broker, "topic": r.pub.topic, "qos": r.pub.qos, "retain": r.pub.retain},
            "workers": r.workers,
            "timeout_s": r.timeout,
            "error_topic": r.error_topic,
            **_keyed(r),
            "trial": r.trial, "trial_of": r.trial_of,  # a shadow's or canary's companion: its kind and rule
            "shadow": r.shadow.model_dump() if r.shadow else None,
            "canary": r.canary.model_dump() if r.canary else None,
        })
    return {"rules": out, "brokers": {n: _broker(n, b, procs) for n, b in cfg.brokers.items()}}


def _loaded(workers: list[Proc]) -> dict[str, Any]:
    """What the most recently loaded live worker of a model reports (else the most recent dead one)."""
    pick = max(workers, key=lambda p: (bool(p["alive"]), p.get("loaded_at") or 0.0))
    shas = sorted({p["sha256"] for p in workers if p["alive"] and p.get("sha256")})
    return {"source": pick.get("source"), "sha256": pick.get("sha256"), "loaded_at": pick.get("loaded_at"),
            "workers_loaded": len({p["pid"] for p in workers if p["alive"]}),  # a pool process once, whatever its rules
            "sha256_differs": len(shas) > 1}


def models(cfg: Config, procs: list[Proc]) -> dict[str, Any]:
    """The GET /models document: per configured model, its package and the rules using it; source, sha256
    and loaded_at come from the workers' snapshots, or from the config (sha256 and loaded_at null) until a
    worker of it has reported."""
    out = []
    for name, spec in cfg.models.items():
        users = [r.name for r in cfg.rules if r.model == name]
        workers = [p for p in procs if p["stage"] == "rule" and p.get("model") == name and p.get("pid")]
        doc = {"name": name, "path": str(spec.path), "rules": users}
        if workers:
            doc.update(_loaded(workers))
        else:
            doc.update(source=str(spec.path), sha256=None, loaded_at=None, workers_loaded=0, sha256_differs=False)
        out.append(doc)
    return {"models": out}
