"""`pipeline status [--url URL | -c FILE] [--watch]`: the control API's GET /stages as a table (rich).

Only the standard library is imported at module level: `pipeline` builds its parser on every start, and
rich and the HTTP client load only when this command runs.
"""

from __future__ import annotations

import argparse
import signal
import ssl
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

DEFAULT_URL = "http://127.0.0.1:5888"
DASH = "\u2013"


def add_commands(sub: Any) -> None:
    """Register `status` on the `pipeline` command's subparsers."""
    text = "print the stages of a running stack (GET /stages) as a table"
    sp = sub.add_parser("status", help=text, description=text)
    sp.add_argument("--url", help=f"the control API (default: control.listen of -c FILE, else {DEFAULT_URL})")
    sp.add_argument("-c", "--config", help="a configuration file whose control.listen names the control API")
    sp.add_argument("--watch", action="store_true", help="refresh every --interval seconds until Ctrl-C")
    sp.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    sp.set_defaults(func=cmd_status)


def base_url(url: str | None, config_file: str | None) -> str:
    """The control API's base URL: --url, else the config's control.listen, else the default."""
    if url:
        return url.rstrip("/") if "://" in url else f"http://{url.rstrip('/')}"
    if config_file:
        from pipeline.config import load as config
        from pipeline.control.hosts import local_url

        return local_url(config.load(config_file).control)
    return DEFAULT_URL


@dataclass(frozen=True, kw_only=True)
class Target:
    """Where and how to read /stages: with -c FILE, the config's token and its control.tls certificate."""

    base: str
    headers: dict[str, str] = field(default_factory=dict)
    context: ssl.SSLContext | None = None


def target(url: str | None, config_file: str | None) -> Target:
    """`base_url`, plus the token and the pinned certificate when they come from the config file."""
    if url or not config_file:
        return Target(base=base_url(url, config_file))
    from pipeline.config import load as config
    from pipeline.control.hosts import local_url, pinned_context

    control = config.load(config_file).control
    token = control.token.get_secret_value() if control.token else None
    return Target(base=local_url(control), headers={"Authorization": f"Bearer {token}"} if token else {},
                  context=pinned_context(control))


def fetch(to: Target | str, timeout: float = 3.0) -> dict[str, Any]:
    """GET /stages as a dict; OSError (URLError included) when the control API cannot be reached."""
    import urllib.request

    import orjson

    to = Target(base=to) if isinstance(to, str) else to
    req = urllib.request.Request(f"{to.base}/stages", headers=to.headers)
    with urllib.request.urlopen(req, timeout=timeout, context=to.context) as resp:
        return orjson.loads(resp.read())


def _num(value: Any, digits: int = 0) -> str:
    if value is None:
        return DASH
    return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def _row(st: dict[str, Any]) -> list[str]:
    kind = "rule" if st["name"].startswith("rule:") else st["name"]
    out, errors = {"ingress": ("dispatched", "unrouted"), "egress": ("published", "dropped"),
                   "rule": ("processed", "errors")}[kind]
    lat = st.get("latency_ms") or {}
    workers = f"{st['workers_alive']}/{st['workers']}" if "workers" in st else DASH
    brokers = ", ".join(f"{n} {s}" for n, s in sorted((st.get("brokers") or {}).items())) or DASH
    up = "[green]up[/]" if st["up"] else "[bold red]DOWN[/]"
    return [st["name"], up, workers, _num(st.get("received")), f"{_num(st.get(out))} {out}",
            f"{_num(st.get(errors))} {errors}", _num(st.get("depth")), _num(st.get("in_flight")),
            _num(st.get("rate_per_s"), 1), _num(lat.get("p50"), 2), _num(lat.get("p99"), 2), brokers]


def table(doc: dict[str, Any], source: str = "") -> Any:
    """A rich Table of a /stages document, with what keeps the stack from being ready as its caption."""
    from rich.table import Table

    from pipeline.telemetry.readiness import not_ready

    stamp = time.strftime("%H:%M:%S", time.localtime(doc.get("time", time.time())))
    problems = not_ready(doc)
    caption = "[green]ready[/]" if not problems else "[red]not ready:[/] " + "; ".join(problems)
    t = Table(title=f"pipeline stages {source} at {stamp}".replace("  ", " "), caption=caption)
    for head in ("stage", "up", "workers", "received", "out", "errors", "depth", "in flight", "msg/s",
                 "p50 ms", "p99 ms", "brokers"):
        t.add_column(head, justify="left" if head in ("stage", "up", "brokers") else "right")
    for st in doc["stages"]:
        t.add_row(*_row(st))
    return t


def _snapshot(to: Target) -> tuple[Any, bool]:
    """(what to show, whether /stages was read)."""
    from rich.text import Text

    try:
        return table(fetch(to), to.base), True
    except (OSError, ValueError) as e:
        return Text(f"cannot read {to.base}/stages: {e}", style="bold red"), False


def _watch(console: Any, base: Target, interval: float, stop: threading.Event) -> None:
    """Redraw in place on a terminal; print one table per refresh into a pipe or a file; until `stop` is set."""
    from rich.live import Live

    if not console.is_terminal:
        while not stop.is_set():
            console.print(_snapshot(base)[0])
            stop.wait(interval)
        return
    with Live(_snapshot(base)[0], console=console, auto_refresh=False) as live:
        while not stop.wait(interval):
            live.update(_snapshot(base)[0], refresh=True)


def cmd_status(args: argparse.Namespace) -> int:
    from rich.console import Console

    from pipeline.errors import PipelineError

    console = Console()
    if not console.is_terminal:  # piped or captured: do not squeeze twelve columns into 80
        console = Console(width=max(console.width, 160))
    try:
        base = target(args.url, args.config)
    except PipelineError as e:
        print(e, file=sys.stderr)
        return e.exit_code
    if not args.watch:
        shown, ok = _snapshot(base)
        console.print(shown)
        return 0 if ok else 1
    stop = threading.Event()  # Ctrl-C or SIGTERM only sets it: the loop ends between two refreshes, wherever
    for sig in (signal.SIGINT, signal.SIGTERM):  # the signal lands (a KeyboardInterrupt inside rich or urllib
        signal.signal(sig, lambda *_: stop.set())  # could be swallowed or leave the terminal half drawn)
    _watch(console, base, max(0.1, args.interval), stop)
    return 0
