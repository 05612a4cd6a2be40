"""The falcon application. `create_app(cfg, board)` takes its data source; `server.py` wires the real one."""

from __future__ import annotations

from typing import Any, Protocol

import falcon
import orjson

from pipeline.config import Config
from pipeline.control import views


class Source(Protocol):
    def processes(self) -> list[dict[str, Any]]: ...


def _json(resp: falcon.Response, doc: Any, status: str = falcon.HTTP_200) -> None:
    resp.status = status
    resp.content_type = falcon.MEDIA_JSON
    resp.data = orjson.dumps(doc)


class Health:
    def on_get(self, _req: falcon.Request, resp: falcon.Response) -> None:
        _json(resp, {"status": "ok"})


class Ready:
    def __init__(self, cfg: Config, source: Source) -> None:
        self.cfg, self.source = cfg, source

    def on_get(self, _req: falcon.Request, resp: falcon.Response) -> None:
        problems = views.not_ready(views.stages(self.cfg, self.source.processes()))
        _json(resp, {"ready": not problems, "problems": problems}, falcon.HTTP_503 if problems else falcon.HTTP_200)


class Stages:
    def __init__(self, cfg: Config, source: Source) -> None:
        self.cfg, self.source = cfg, source

    def on_get(self, _req: falcon.Request, resp: falcon.Response) -> None:
        _json(resp, views.stages(self.cfg, self.source.processes()))


def create_app(cfg: Config, source: Source) -> falcon.App:
    app = falcon.App()
    app.add_route("/healthz", Health())
    app.add_route("/readyz", Ready(cfg, source))
    app.add_route("/stages", Stages(cfg, source))
    return app
