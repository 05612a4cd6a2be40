"""Whether a stack is ready, read from its /stages document: the one rule for /readyz and `pipeline status`."""

from __future__ import annotations

from typing import Any

from pipeline.config.schema.behaviour import SHADOW


def not_ready(doc: dict[str, Any]) -> list[str]:
    """What keeps the stack from being ready: stages down (but a shadow's: it is best effort, the live path does not
    need it), brokers not connected, an outbox on a full disk."""
    problems = []
    for st in doc["stages"]:
        if not st["up"] and st.get("trial") != SHADOW:
            problems.append(f"{st['name']} is down")
        for name, state in st.get("brokers", {}).items():
            if state != "connected":
                problems.append(f"{st['name']}: broker {name} is {state}")
        if (st.get("outbox") or {}).get("disk_full"):
            problems.append(f"{st['name']}: outbox: disk full (results wait; no input is acknowledged)")
    return problems
