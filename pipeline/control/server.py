"""gunicorn wiring: one worker process, a few threads; the stats board is made inside the worker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import falcon
from gunicorn.app.base import BaseApplication

from pipeline.config import Config
from pipeline.control.app import create_app
from pipeline.control.board import Board
from pipeline.endpoints import Endpoints


def get_app(cfg: Config, run_dir: Path) -> falcon.App:
    """The real application: a board listening on the stack's stats endpoint."""
    board = Board(endpoints=Endpoints.for_config(cfg, run_dir)).start()
    return create_app(cfg, board, run_dir)


class ControlServer(BaseApplication):
    """gunicorn's `self.cfg` is its own settings object; ours is `self.pipeline`."""

    def __init__(self, pipeline: Config, run_dir: Path, log_level: str) -> None:
        self.pipeline, self.run_dir = pipeline, run_dir
        self.options: dict[str, Any] = {
            "bind": pipeline.control.listen,
            "workers": 1,
            "threads": 4,
            "worker_class": "gthread",
            "accesslog": None,
            "loglevel": log_level.lower(),
            "graceful_timeout": 3,
            "proc_name": "pipeline-control",
        }
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> falcon.App:
        return get_app(self.pipeline, self.run_dir)
