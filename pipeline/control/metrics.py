"""GET /metrics: the board in Prometheus text exposition, made fresh for each request.

`Collector` turns one list of process snapshots into metric families; `exposition()` registers it in a
registry of its own (no process-global state) and renders it. Names:

- `pipeline_stage_up`, `pipeline_stage_depth`, `pipeline_stage_processes` {stage, rule}; `pipeline_rule_workers`
  {rule} (configured); `pipeline_broker_connected` {stage, broker}.
- every stage counter, summed over the stage's processes (dead ones included, so a restart never makes a
  counter go backwards): `pipeline_<stage>_<name>_total` ({rule} for workers); a counter `<name>.<rule>`
  becomes `pipeline_<stage>_<name>_by_rule_total` {rule}.
- every latency histogram as a Prometheus histogram in seconds: `pipeline_rule_call_seconds` {rule},
  `pipeline_egress_end_to_end_seconds` {rule} (`_sum`/`_count` only when the stages report sums).
- per live process: `pipeline_process_resident_memory_bytes`, `pipeline_process_cpu_seconds_total`,
  `pipeline_process_start_time_seconds` {stage, rule, pid}.
- when the stages report them: `pipeline_stage_in_flight` {stage, rule}, `pipeline_ingress_unacked` {broker},
  `pipeline_egress_outbox_rows`, `pipeline_egress_outbox_bytes`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from pipeline.control import views
from pipeline.telemetry import aggregation
from pipeline.telemetry.aggregation import Proc
from pipeline.telemetry.reporter import BUCKETS

if TYPE_CHECKING:  # pipeline.config.load loads pydantic; a stage gets its config from pipeline.config.snapshot
    from pipeline.config.load import Config

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STAGE = ("stage", "rule")
PROC = ("stage", "rule", "pid")
STAGE_GAUGES = {
    "up": "1 when a process of the stage reported lately",
    "depth": "messages that entered the stage and did not leave it",
    "processes": "live processes of the stage",
    "in_flight": "messages the stage holds awaiting completion (when the stage reports it)",
}


def _name(*parts: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", "_".join(("pipeline", *parts)))


def _split(key: str, proc_rule: str | None) -> tuple[str, bool]:
    """counter/histogram key of a process -> (its rule label, keyed by a rule suffix?)."""
    _base, dot, suffix = key.partition(".")
    return (suffix, True) if dot else (proc_rule or "", False)


class Collector:
    """Prometheus collector: the /metrics families computed from the stage snapshots on each scrape."""

    def __init__(self, cfg: Config, procs: list[Proc]) -> None:
        self.cfg, self.procs = cfg, procs

    def collect(self) -> Iterator[Metric]:
        yield from self._stages()
        yield from self._counters()
        yield from self._histograms()
        yield from self._processes()

    def _stages(self) -> Iterator[Metric]:
        gauges = {k: GaugeMetricFamily(_name("stage", k), doc, labels=STAGE) for k, doc in STAGE_GAUGES.items()}
        brokers = GaugeMetricFamily(_name("broker_connected"), "1 when the stage's MQTT connection is up",
                                    labels=("stage", "broker"))
        for st in views.stages(self.cfg, self.procs)["stages"]:
            stage, _, rule = st["name"].partition(":")
            labels = ["rule" if rule else stage, rule]
            live = [p for p in self.procs if p["alive"] and p["stage"] == labels[0] and (p.get("rule") or "") == rule]
            values = {"up": float(st["up"]), "depth": st["depth"], "processes": len(live),
                      "in_flight": st.get("in_flight")}
            for k, v in values.items():
                _add(gauges[k], labels, v)
            for name, state in st.get("brokers", {}).items():
                brokers.add_metric([stage, name], float(state == "connected"))
        workers = GaugeMetricFamily(_name("rule_workers"), "worker processes configured for the rule",
                                    labels=("rule",))
        for r in self.cfg.rules:
            workers.add_metric([r.name], r.workers)
        yield from (*gauges.values(), brokers, workers)

    def _group(self, field: str) -> dict[tuple[str, str, str, bool], list[Proc]]:
        """(stage, base name, rule label, per-rule key?) -> processes holding that counter or histogram."""
        out: dict[tuple[str, str, str, bool], list[Proc]] = {}
        for p in self.procs:
            for key in p.get(field, {}):
                rule, keyed = _split(key, p.get("rule"))
                out.setdefault((p["stage"], key, rule, keyed), []).append(p)
        return out

    def _counters(self) -> Iterator[Metric]:
        families: dict[str, CounterMetricFamily] = {}
        for (stage, key, rule, keyed), procs in sorted(self._group("counters").items()):
            base = key.partition(".")[0]
            name = _name(stage, base, "by_rule") if keyed else _name(stage, base)
            labelled = keyed or stage == "rule"
            if name not in families:
                families[name] = CounterMetricFamily(name, f"{stage} counter {base}"
                                                     + (" per rule" if labelled else ""),
                                                     labels=("rule",) if labelled else ())
            families[name].add_metric([rule] if labelled else [], aggregation.total(procs, key))
        yield from families.values()

    def _histograms(self) -> Iterator[Metric]:
        families: dict[str, HistogramMetricFamily] = {}
        for (stage, key, rule, _keyed), procs in sorted(self._group("histograms").items()):
            base = key.partition(".")[0]
            name = _name(stage, base, "seconds")
            if name not in families:
                families[name] = HistogramMetricFamily(name, f"{stage} latency {base} in seconds",
                                                       labels=("rule",))
            families[name].add_metric([rule], _cumulative(aggregation.histogram(procs, key)),
                                      aggregation.histogram_sum(procs, key))
        yield from families.values()

    def _processes(self) -> Iterator[Metric]:
        rss = GaugeMetricFamily(_name("process_resident_memory_bytes"), "resident memory", labels=PROC)
        cpu = CounterMetricFamily(_name("process_cpu_seconds"), "user + system CPU time", labels=PROC)
        start = GaugeMetricFamily(_name("process_start_time_seconds"), "unix time the process started",
                                  labels=PROC)
        for p in self.procs:
            if not p["alive"]:
                continue
            labels = [p["stage"], p.get("rule") or "", str(p["pid"])]
            _add(rss, labels, p.get("rss_bytes"))
            _add(cpu, labels, p.get("cpu_seconds"))
            _add(start, labels, p.get("started"))
        yield from (rss, cpu, start)
        yield from self._queues()

    def _queues(self) -> Iterator[Metric]:
        """What ingress has not acked to its brokers yet, and egress's outbox (when the stages report them)."""
        unacked = GaugeMetricFamily(_name("ingress_unacked"), "messages not yet acked to the broker",
                                    labels=("broker",))
        rows = GaugeMetricFamily(_name("egress_outbox_rows"), "results in egress's outbox")
        size = GaugeMetricFamily(_name("egress_outbox_bytes"), "payload bytes in egress's outbox")
        for p in self.procs:
            if p["alive"] and p["stage"] == "ingress":
                for broker, n in sorted((p.get("unacked") or {}).items()):
                    unacked.add_metric([broker], n)
            if p["alive"] and p["stage"] == "egress" and isinstance(p.get("outbox"), dict):
                _add(rows, [], p["outbox"].get("rows"))
                _add(size, [], p["outbox"].get("bytes"))
        yield from (unacked, rows, size)


def _add(family: Metric, labels: list[str], value: Any) -> None:
    if value is not None:
        family.add_metric(labels, value)


def _cumulative(counts: list[int]) -> list[tuple[str, float]]:
    """Bucket counts (BUCKETS then +Inf) -> Prometheus's cumulative (le, count) pairs, +Inf last."""
    out, running = [], 0
    for i, bound in enumerate(BUCKETS):
        running += counts[i] if i < len(counts) else 0
        out.append((floatToGoString(bound), running))
    out.append(("+Inf", sum(counts)))
    return out


def exposition(cfg: Config, procs: list[Proc]) -> bytes:
    """Prometheus text for one list of process snapshots."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(cfg, procs))
    return generate_latest(registry)
