"""The code base stays ruff-clean (the rules are in pyproject.toml), and the walls of its layout hold: stages never
import each other, control reads only the stages' snapshots, no import circle, no private name imported from another
module, no function over 60 lines."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
MAX_FUNCTION_LINES = 60


def test_ruff_clean():
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "pipeline", "tests", "benchmarks"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def _modules() -> dict[str, Path]:
    out = {}
    for path in (ROOT / "pipeline").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if "models" in parts[2:-1] and parts[1] == "commands":  # the bench's model folders are not the package's
            continue
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node, except what sits under `if TYPE_CHECKING:` (never imported at run time)."""
    out, todo = [], [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            todo += node.orelse
            continue
        todo += ast.iter_child_nodes(node)
    return out


def _imports(path: Path) -> set[str]:
    """The pipeline modules `path` imports at run time, at its top or inside a function."""
    out = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                out.add(full if full in MODULES else node.module)
    return {m for m in out if m in MODULES}


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def test_no_import_circle():
    circles, state, path = [], {}, []

    def visit(m: str) -> None:
        state[m] = "open"
        path.append(m)
        for n in sorted(GRAPH[m]):
            if state.get(n) == "open":
                circles.append(" -> ".join([*path[path.index(n):], n]))
            elif n not in state:
                visit(n)
        state[m] = "done"
        path.pop()

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)
    assert not circles, circles


def test_stages_never_import_each_other():
    stages = ("ingress", "worker", "egress")
    crossing = [(m, n) for m, imported in GRAPH.items() for s in stages if m.startswith(f"pipeline.stages.{s}")
                for n in imported if n.startswith("pipeline.stages.") and not n.startswith(f"pipeline.stages.{s}")]
    assert not crossing, crossing


def test_control_reads_only_snapshots():
    reaching = [(m, n) for m, imported in GRAPH.items() if m.startswith("pipeline.control")
                for n in imported if n.startswith("pipeline.stages")]
    assert not reaching, reaching


def test_no_private_name_is_imported_from_another_module():
    found = [f"{path.relative_to(ROOT)}: from {node.module} import {a.name}"
             for path in MODULES.values() for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline")
             for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert not found, found


def test_no_function_is_over_60_lines():
    long = [f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in MODULES.values() for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, long
