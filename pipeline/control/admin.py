"""The control API's guarded part: the bearer-token check, GET /models (with each model's last reload) and
POST /models/{name}/reload.

Every request but GET/HEAD/OPTIONS needs `Authorization: Bearer <control.token>`; without a token configured,
such endpoints are disabled. With `control.protect_reads` the reads need it too, except /healthz and /readyz
(probes) and the dashboard's page and files (/ and /static/: no data; the page asks for the token and sends it
with each read). Both refusals are 403 with a JSON body that says which case it is.
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import TYPE_CHECKING, Any

import falcon

from pipeline.control import catalog, trials
from pipeline.control.http import send_json as _json
from pipeline.telemetry.aggregation import Proc

if TYPE_CHECKING:  # pipeline.config.load loads pydantic; a stage gets its config from pipeline.config.snapshot
    from pipeline.config.load import Config, Control

OPEN = frozenset({"/healthz", "/readyz", "/"})
STATIC = "/static/"


class Guard:
    """falcon middleware: the token check."""

    def __init__(self, control: Control) -> None:
        self.token = control.token.get_secret_value().encode() if control.token else None
        self.reads = control.protect_reads

    def process_request(self, req: falcon.Request, _resp: falcon.Response) -> None:
        if req.method in ("GET", "HEAD", "OPTIONS") and (
                not self.reads or req.path in OPEN or req.path.startswith(STATIC)):
            return
        if self.token is None:
            raise falcon.HTTPForbidden(
                title="disabled", description="endpoints that change the stack are disabled: set control.token "
                "(e.g. token: ${PIPELINE_TOKEN}) in the config and send Authorization: Bearer <token>")
        scheme, _, given = (req.get_header("Authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token):
            raise falcon.HTTPForbidden(title="token required",
                                       description="send Authorization: Bearer <control.token>")


def _workers(procs: list[Proc], name: str) -> list[dict[str, Any]]:
    keys = ("pid", "rule", "model", "sha256", "loaded_at", "alive")
    return [{k: p.get(k) for k in keys} for p in procs
            if p["stage"] == "rule" and p.get("model") == name and p.get("pid") and p.get("alive")]


def models(cfg: Config, procs: list[Proc], run_dir: Path | None) -> dict[str, Any]:
    """GET /models: catalog.models, plus the configured source (path or url, no credentials), the live
    workers with the version each loaded, the last reload's result (null when there was none), and `trials`: each
    shadow and canary with its two versions side by side (pipeline.control.trials)."""
    from pipeline.supervision import (
        reload,  # here and in Reload: loaded on first use, like prometheus_client
    )

    doc = catalog.models(cfg, procs)
    for entry in doc["models"]:
        spec = cfg.models[entry["name"]]
        entry["path"] = str(spec.path) if spec.path is not None else None
        entry["configured"] = spec.where
        if not entry["workers_loaded"]:
            entry["source"] = spec.where
        entry["workers"] = _workers(procs, entry["name"])
        entry["reload"] = reload.last(run_dir, entry["name"])
    doc["trials"] = trials.trials(cfg, procs, run_dir)
    return doc


class Models:
    """GET /models: every model, its source, version and the workers that loaded it."""

    def __init__(self, cfg: Config, source: Any, run_dir: Path | None) -> None:
        self.cfg, self.source, self.run_dir = cfg, source, run_dir

    def on_get(self, _req: falcon.Request, resp: falcon.Response) -> None:
        _json(resp, models(self.cfg, self.source.processes(), self.run_dir))


class Reload:
    """POST /models/{name}/reload: answers when the reload is done (200) or failed (422, old version kept)."""

    def __init__(self, cfg: Config, source: Any, run_dir: Path | None) -> None:
        self.cfg, self.source, self.run_dir = cfg, source, run_dir

    def on_post(self, _req: falcon.Request, resp: falcon.Response, name: str) -> None:
        if name not in self.cfg.models:
            raise falcon.HTTPNotFound(title="no such model",
                                      description=f"no model named '{name}' (models: {', '.join(self.cfg.models)})")
        if self.run_dir is None:
            raise falcon.HTTPServiceUnavailable(title="unavailable", description="this control API runs no stack")
        from pipeline.supervision import reload

        try:  # a Reloader keeps no state: the lock and the last results are files in the run dir
            result = reload.Reloader(self.cfg, self.run_dir, self.source.processes).reload(name, "api")
        except reload.Busy as e:
            raise falcon.HTTPConflict(title="busy", description=str(e)) from None
        _json(resp, result, falcon.HTTP_200 if result["ok"] else falcon.HTTP_422)
