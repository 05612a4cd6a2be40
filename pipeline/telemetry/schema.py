"""The snapshot a stage process publishes twice a second: its fields, spelled once for the stages that fill them
(`Reporter` and each stage's gauges) and for control and `pipeline status`, which read them.

Every snapshot has the `Head` and `Snapshot` fields; a stage adds its own: ingress `depth`, `rules` (one
`RuleQueueLevels` per rule) and `unacked` (per broker); egress `outbox` (`OutboxLevels`); ingress and egress
`brokers` (name -> link state) and `protocols` (name -> the MQTT version of its last accepted connection, "5" or
"3.1.1"); a worker `model`, `sha256`, `source` and `loaded_at`. Counter and histogram names
are the stage's own (`received`, `dispatched.<rule>`, `end_to_end.<rule>`...). The board adds `alive` and `prev`.
"""

from __future__ import annotations

from typing import Any, TypedDict


class Head(TypedDict):
    """Who sent the snapshot: a process is (pid, started), so a reused pid is a new process."""

    stage: str  # "ingress", "egress" or "rule"
    rule: str | None  # a worker's rule
    pid: int
    started: float  # unix time the process started


class RuleQueueLevels(TypedDict, total=False):
    """One rule's queue at ingress (`rules.<rule>`); `keys` only for a keyed rule."""

    pending: int  # held by ingress, not given to a worker yet (backlog and retries)
    in_flight: int  # held by workers and not confirmed (QoS 1 held + QoS 0 held)
    workers: int  # workers ingress knows
    at_workers: int  # sent to workers and not answered
    answered: int  # answered by a worker, not yet confirmed by egress
    keys: int  # keys with a message waiting or in flight


class OutboxLevels(TypedDict):
    """Egress's outbox (`outbox`)."""

    rows: int
    bytes: int
    full: bool
    set_aside: int  # rows the broker will never take, kept aside
    set_aside_last: list[dict[str, Any]]  # the newest of them: id, rule, topic, reason, at
    disk_full: bool  # results wait in memory: the disk refused the last write


class Snapshot(Head, total=False):
    """A stage process's snapshot as published (stage-specific fields only from the stages that send them)."""

    time: float
    counters: dict[str, int]
    histograms: dict[str, list[int]]  # counts per bucket of reporter.BUCKETS, then +Inf
    sums: dict[str, float]  # total seconds observed per histogram
    rss_bytes: int
    cpu_seconds: float
    brokers: dict[str, str]
    protocols: dict[str, str]
    depth: int
    rules: dict[str, RuleQueueLevels]
    unacked: dict[str, int]
    outbox: OutboxLevels
    model: str
    sha256: str
    source: str
    loaded_at: float
