"""The falcon application. `create_app(cfg, source)` takes its data source; `server.py` wires the real one.

Every request reads the source once and derives its document from that one list of process snapshots,
so the figures of one answer are consistent with each other.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import falcon

from pipeline.control import admin, catalog, gate, record, state, views
from pipeline.control.http import send_json as _json
from pipeline.telemetry.readiness import not_ready

if TYPE_CHECKING:  # pipeline.config.load loads pydantic; a stage gets its config from pipeline.config.snapshot
    from pipeline.config.load import Config

STATIC = Path(__file__).parent / "static"


class Source(Protocol):
    """What the resources read the stage snapshots from (a `Board`, or a fake in tests)."""

    def processes(self) -> list[dict[str, Any]]: ...


class Health:
    """GET /healthz: the control process answers."""

    def on_get(self, _req: falcon.Request, resp: falcon.Response) -> None:
        _json(resp, {"status": "ok"})


class Ready:
    """GET /readyz: 200 when every stage reports and every broker is connected, else 503 with the reasons."""

    def __init__(self, cfg: Config, source: Source) -> None:
        self.cfg, self.source = cfg, source

    def on_get(self, _req: falcon.Request, resp: falcon.Response) -> None:
        problems = not_ready(views.stages(self.cfg, self.source.processes()))
        _json(resp, {"ready": not problems, "problems": problems}, falcon.HTTP_503 if problems else falcon.HTTP_200)


class Document:
    """A JSON document made by `make(cfg, processes)`."""

    def __init__(self, cfg: Config, source: Source, make: Callable[[Config, list[dict[str, Any]]], Any]) -> None:
        self.cfg, self.source, self.make = cfg, source, make

    def on_get(self, _req: falcon.Request, resp: falcon.Response) -> None:
        _json(resp, self.make(self.cfg, self.source.processes()))


class Metrics:
    """GET /metrics: the Prometheus text of `Collector`."""

    def __init__(self, cfg: Config, source: Source) -> None:
        self.cfg, self.source = cfg, source

    def on_get(self, _req: falcon.Request, resp: falcon.Response) -> None:
        from pipeline.control import metrics  # prometheus_client: loaded by the first scrape

        resp.content_type = metrics.CONTENT_TYPE
        resp.data = metrics.exposition(self.cfg, self.source.processes())


class Dashboard:
    """GET /: the dashboard page (its scripts and styles are under /static/)."""

    def on_get(self, _req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_HTML
        resp.cache_control = ["no-cache"]
        resp.data = (STATIC / "index.html").read_bytes()


def create_app(cfg: Config, source: Source, run_dir: Path | None = None) -> falcon.App:
    """`run_dir`: the stack's run directory (reloads need it; without it POST /models/{name}/reload is 503)."""
    app = falcon.App(middleware=[gate.Gate(cfg.control), admin.Guard(cfg.control)])
    app.add_route("/healthz", Health())
    app.add_route("/readyz", Ready(cfg, source))
    app.add_route("/stages", Document(cfg, source, views.stages))
    app.add_route("/queue_size_metrics", Document(cfg, source, views.queue_size_metrics))
    app.add_route("/models", admin.Models(cfg, source, run_dir))
    app.add_route("/models/{name}/reload", admin.Reload(cfg, source, run_dir))
    app.add_route("/rules", Document(cfg, source, catalog.rules))  # the rules as configured (no secret)
    app.add_route("/rules/{name}/state/{key:path}", state.KeyState(cfg))  # a key may hold "/"
    app.add_route("/rules/{name}/record", record.Record(cfg, run_dir))  # ingress's tap (pipeline record)
    app.add_route("/metrics", Metrics(cfg, source))
    app.add_route("/", Dashboard())
    app.add_static_route("/static", str(STATIC))
    return app
