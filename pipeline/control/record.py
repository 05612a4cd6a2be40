"""POST, DELETE and GET /rules/{name}/record: a recording of what a rule receives, by ingress's tap.

POST starts one (409 while one runs) with the bounds of its query (`count`, `bytes`, `seconds`; each has a
default and a ceiling, `pipeline.rollout.taps`) and answers once ingress took it (200, its status) or after
TAKE_WAIT (202: asked, ingress has not answered). DELETE stops it and answers with the final status, which names
the capture file in the run directory. GET answers the status of the last recording. POST and DELETE need the
token (`admin.Guard`), GET too with `protect_reads`. Control and ingress share only files (`rollout.taps`).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import falcon

from pipeline.control.http import send_json as _json
from pipeline.rollout import taps

if TYPE_CHECKING:  # pipeline.config.load loads pydantic; a stage gets its config from pipeline.config.snapshot
    from pipeline.config.load import Config

TAKE_WAIT = 3.0  # seconds POST waits for ingress to start recording
END_WAIT = 5.0  # seconds DELETE waits for ingress to finish the capture


class Record:
    """The tap of one rule: start, stop, look."""

    def __init__(self, cfg: Config, run_dir: Path | None) -> None:
        self.rules, self.run_dir = {r.name for r in cfg.live_rules()}, run_dir  # a companion gets no MQTT input

    def _check(self, name: str) -> Path:
        if name not in self.rules:
            raise falcon.HTTPNotFound(title="no such rule",
                                      description=f"no rule named '{name}' (rules: {', '.join(sorted(self.rules))})")
        if self.run_dir is None:
            raise falcon.HTTPServiceUnavailable(title="unavailable", description="this control API runs no stack")
        return self.run_dir

    def on_get(self, _req: falcon.Request, resp: falcon.Response, name: str) -> None:
        run_dir = self._check(name)
        current = taps.status(run_dir, name)
        if current is None:
            raise falcon.HTTPNotFound(title="no recording", description=f"rule '{name}' was never recorded")
        _json(resp, asdict(current))

    def on_post(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        run_dir = self._check(name)
        try:
            request = taps.Request(name, count=req.get_param_as_int("count", default=taps.DEFAULT_COUNT),
                                   bytes=req.get_param_as_int("bytes", default=taps.DEFAULT_BYTES),
                                   seconds=req.get_param_as_float("seconds", default=taps.DEFAULT_SECONDS))
        except falcon.HTTPBadRequest as e:
            raise falcon.HTTPBadRequest(title="bad bounds", description=e.description) from None
        why = request.problem()
        if why:
            raise falcon.HTTPBadRequest(title="bad bounds", description=why)
        running = taps.asked(run_dir, name)
        if running is not None:
            raise falcon.HTTPConflict(title="recording", description=f"rule '{name}' is being recorded already "
                                      f"(request {running.id}): DELETE /rules/{name}/record stops it")
        taps.ask(run_dir, request)
        started = _wait(run_dir, name, request.id, ("recording", "done"), TAKE_WAIT)
        if started is None:
            _json(resp, {"id": request.id, "rule": name, "state": "asked"}, falcon.HTTP_202)
            return
        _json(resp, asdict(started))

    def on_delete(self, _req: falcon.Request, resp: falcon.Response, name: str) -> None:
        run_dir = self._check(name)
        running = taps.asked(run_dir, name)
        last = taps.status(run_dir, name)
        if running is None and (last is None or last.state == "done"):
            raise falcon.HTTPNotFound(title="not recording", description=f"rule '{name}' is not being recorded")
        request_id = running.id if running is not None else last.id  # type: ignore[union-attr]
        taps.withdraw(run_dir, name, request_id)
        ended = _wait(run_dir, name, request_id, ("done",), END_WAIT)
        if ended is None:
            raise falcon.HTTPGatewayTimeout(title="ingress did not answer",
                                            description=f"the recording of '{name}' was asked to stop; ingress has "
                                            f"not said it ended after {END_WAIT:g}s (GET /rules/{name}/record)")
        _json(resp, asdict(ended))


def _wait(run_dir: Path, rule: str, request_id: str, states: tuple[str, ...], seconds: float) -> taps.Status | None:
    """The status of request `request_id` once it is in one of `states`, or None after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        current = taps.status(run_dir, rule)
        if current is not None and current.id == request_id and current.state in states:
            return current
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)
