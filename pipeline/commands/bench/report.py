"""How `pipeline bench` shows its results: rich tables, a JSON document and a PNG of latency vs throughput."""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table

STACK_STAGES = ("supervisord", "up", "broker", "ingress", "worker", "egress", "control")


def rate_label(rate: float | str) -> str:
    return "max" if rate in (0, "max") else f"{float(rate):,.0f}"


def _ms(value: float) -> str:
    return f"{value:.2f}" if value < 100 else f"{value:,.0f}"


def stack_totals(run: dict[str, Any]) -> tuple[float, float]:
    """CPU % and RSS MiB of the stack's own processes (not loadgen, not the bench)."""
    mine = [u for name, u in run["stages"].items() if name.split(":")[0] in STACK_STAGES]
    return sum(u["cpu_pct"] for u in mine), sum(u["rss_mib"] for u in mine)


def run_table(run: dict[str, Any]) -> Table:
    lat = run["latency_ms"]
    t = Table(title=f"QoS {run['qos']} · rate {rate_label(run['rate'])} msg/s · rule {run['rule']}",
              title_justify="left")
    for col in ("offered/s", "sent", "delivered", "lost", "dup", "errors", "throughput/s",
                "p50 ms", "p90 ms", "p99 ms", "max ms"):
        t.add_column(col, justify="right")
    t.add_row(f"{run['offered']:,.0f}", f"{run['sent']:,}", f"{run['delivered']:,}", f"{run['lost']:,}",
              f"{run['duplicates']:,}", f"{run['errors']:,}", f"{run['throughput']:,.0f}",
              *(_ms(lat[k]) for k in ("p50", "p90", "p99", "max")))
    return t


def stage_table(run: dict[str, Any]) -> Table:
    t = Table(title="processes", title_justify="left")
    for col, justify in (("stage", "left"), ("procs", "right"), ("CPU %", "right"), ("RSS MiB", "right")):
        t.add_column(col, justify=justify)
    for name, u in run["stages"].items():
        t.add_row(name, str(u["procs"]), f"{u['cpu_pct']:.0f}", f"{u['rss_mib']:.0f}")
    cpu, rss = stack_totals(run)
    t.add_row("[bold]stack total", "", f"[bold]{cpu:.0f}", f"[bold]{rss:.0f}")
    return t


def print_run(console: Console, run: dict[str, Any]) -> None:
    console.print(run_table(run))
    console.print(stage_table(run))
    lg = run["loadgen"]
    console.print(f"loadgen: worst {lg['max_behind'] * 1000:.1f} ms behind schedule, slipped {lg['slipped']:.3f} s; "
                  f"{lg['payload_bytes']} B messages; {run['stale']} stale, {run['unparsed']} unparsed result(s)\n")


def summary_table(runs: list[dict[str, Any]]) -> Table:
    t = Table(title="summary", title_justify="left")
    for col in ("QoS", "rate/s", "offered/s", "delivered", "lost", "dup", "throughput/s",
                "p50 ms", "p90 ms", "p99 ms", "max ms", "stack CPU %", "stack RSS MiB"):
        t.add_column(col, justify="right")
    for r in runs:
        lat, (cpu, rss) = r["latency_ms"], stack_totals(r)
        t.add_row(str(r["qos"]), rate_label(r["rate"]), f"{r['offered']:,.0f}", f"{r['delivered']:,}",
                  f"{r['lost']:,}", f"{r['duplicates']:,}", f"{r['throughput']:,.0f}",
                  *(_ms(lat[k]) for k in ("p50", "p90", "p99", "max")), f"{cpu:.0f}", f"{rss:.0f}")
    return t


def document(config: Path, settings: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON document `--json` writes."""
    return {
        "config": str(config),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]},
        "settings": settings,
        "runs": runs,
    }


def write_json(path: str, doc: dict[str, Any]) -> None:
    Path(path).write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")


def plot(path: str, runs: list[dict[str, Any]]) -> str:
    """Latency (p50, p99) vs throughput per QoS as a PNG; returns what was done (or why not)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no PNG: matplotlib is not installed (pip install 'edge-pipeline[bench]')"
    fig, ax = plt.subplots(figsize=(8, 5))
    for color, qos in enumerate(sorted({r["qos"] for r in runs})):
        mine = sorted((r for r in runs if r["qos"] == qos), key=lambda r: r["throughput"])
        xs = [r["throughput"] for r in mine]
        for pct, style in (("p50", "o-"), ("p99", "s--")):
            ax.plot(xs, [max(r["latency_ms"][pct], 1e-3) for r in mine], style, color=f"C{color}",
                    label=f"QoS {qos} {pct}")
        for r in mine:
            ax.annotate(rate_label(r["rate"]), (r["throughput"], max(r["latency_ms"]["p99"], 1e-3)),
                        textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set(xlabel="throughput (msg/s delivered)", ylabel="latency (ms, send to receipt)", yscale="log",
           title="pipeline bench: latency vs throughput (labels: offered rate)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return f"wrote {path}"
