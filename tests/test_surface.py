"""The surface the operator sees stays as captured in tests/data/surface: the `--help` of every command and
subcommand, the field names of /stages and the metric names of /metrics of a real stack.

`PIPELINE_CAPTURE_SURFACE=1 pytest tests/test_surface.py` rewrites the captured files (only when the surface is
meant to change)."""

from __future__ import annotations

import argparse
import difflib
import os
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import HERE
from prometheus_client.parser import text_string_to_metric_families

from pipeline.commands.cli import parser

SURFACE = HERE / "data" / "surface"
CAPTURE = os.environ.get("PIPELINE_CAPTURE_SURFACE") == "1"

CONFIG = """
brokers:
  local: {url: BROKER}
models:
  probe: {path: MODELS/probe, params: {tag: surface}}
rules:
  - name: surface
    sub: {broker: local, topic: "surface/+/in", qos: 1}
    model: probe
    pub: {broker: local, topic: "surface/{1}/out", qos: 1}
    timeout: 5s
control: {listen: CONTROL}
"""


def compare(name: str, text: str) -> None:
    path = SURFACE / name
    if CAPTURE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    before = path.read_text()
    diff = "".join(difflib.unified_diff(before.splitlines(True), text.splitlines(True), "before", "now"))
    assert before == text, f"{name} changed; the operator's surface must stay the same:\n{diff}"


def helps(p: argparse.ArgumentParser, words: tuple[str, ...] = ()) -> dict[str, str]:
    """`pipeline WORDS --help` of the parser and of every subcommand under it."""
    out = {" ".join(("pipeline", *words)): p.format_help()}
    for action in p._actions:
        choices = action.choices if isinstance(action.choices, dict) else {}
        for word, sub in choices.items():
            out.update(helps(sub, (*words, word)))
    return out


def test_help_of_every_command_is_unchanged(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    found = helps(parser())
    text = "".join(f"=== {cmd} --help\n{body}\n" for cmd, body in sorted(found.items()))
    compare("help.txt", text)
    assert len(found) > 15


def paths(doc: object, prefix: str = "") -> set[str]:
    """Every field path of a JSON document; list items share `[]`."""
    if isinstance(doc, dict):
        return set().union(*(paths(v, f"{prefix}.{k}" if prefix else str(k)) for k, v in doc.items())) | {prefix}
    if isinstance(doc, list):
        return set().union(set(), *(paths(v, f"{prefix}[]") for v in doc)) | {prefix}
    return {prefix}


@pytest.mark.timeout(120)
def test_stages_fields_and_metric_names_are_unchanged(broker, probe_factory, stack_factory):
    up = stack_factory(CONFIG.replace("BROKER", broker.url))
    probe = probe_factory("surface/+/out")
    for seq in range(10):
        probe.publish("surface/d1/in", {"seq": seq})
    assert len(probe.wait_for(10, timeout=30)) == 10
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        stages = up.get("/stages")[1]["stages"]
        counted = stages[0].get("received"), stages[1].get("processed"), stages[-1].get("published")
        if counted == (10, 10, 10) and stages[0]["counters"] and all(s.get("latency_ms") for s in stages[1:-1]):
            break
        time.sleep(0.25)
    by_stage = {s["name"]: s for s in stages}
    fields = [f"{name} {path}" for name, s in by_stage.items() for path in sorted(paths(s) - {""})]
    compare("stages.txt", "\n".join(fields) + "\n")
    with urllib.request.urlopen(f"http://{up.control}/metrics", timeout=5) as r:
        families = list(text_string_to_metric_families(r.read().decode()))
    names = sorted({f"{f.type} {s.name} {','.join(sorted(s.labels))}" for f in families for s in f.samples})
    compare("metrics.txt", "\n".join(names) + "\n")


def test_captured_surface_is_in_the_repository():
    assert all((SURFACE / n).is_file() for n in ("help.txt", "stages.txt", "metrics.txt")), Path(SURFACE)
