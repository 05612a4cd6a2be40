"""gunicorn wiring: gunicorn's threaded worker run in this process, without an arbiter, so control is one
process (a second, the arbiter, would hold a whole interpreter to restart a worker that supervisord
restarts anyway). The stats board is made when the worker loads the app.

The worker is pipeline.control.worker's (slow clients hold no thread), with gunicorn's request limits tightened
to what our requests need, HTTPS when control.tls is set, and a warning logged at start when control listens
beyond loopback without TLS or token."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

import falcon
from gunicorn.app.base import BaseApplication

from pipeline.control.app import create_app
from pipeline.control.board import Board
from pipeline.control.hosts import exposure
from pipeline.control.worker import Worker
from pipeline.errors import PipelineError
from pipeline.wire.endpoints import Endpoints

if TYPE_CHECKING:  # pipeline.config.load loads pydantic; a stage gets its config from pipeline.config.snapshot
    from pipeline.config.load import Config

log = logging.getLogger("pipeline.control")

THREADS = 8
LIMITS = {  # gunicorn answers 400 naming the limit; every request of ours fits in a fraction of these
    "limit_request_line": 2048,
    "limit_request_fields": 32,
    "limit_request_field_size": 4096,
    "keepalive": 2,
}


def tls_options(control: Any) -> dict[str, str]:
    """gunicorn's settings for control.tls (none without it)."""
    if control.tls is None:
        return {}
    return {"certfile": str(control.tls.cert), "keyfile": str(control.tls.key)}


def warn_exposure(control: Any) -> None:
    for line in exposure(control):
        log.warning("%s", line)


def get_app(cfg: Config, run_dir: Path) -> falcon.App:
    """The real application: a board listening on the stack's stats endpoint."""
    board = Board(Endpoints.for_config(cfg, run_dir)).start()
    return create_app(cfg, board, run_dir)


class ControlServer(BaseApplication):
    """gunicorn's `self.cfg` is its own settings object; ours is `self.pipeline`."""

    def __init__(self, pipeline: Config, run_dir: Path, log_level: str) -> None:
        self.pipeline, self.run_dir = pipeline, run_dir
        self.options: dict[str, Any] = {
            "bind": pipeline.control.listen,
            "workers": 1,
            "threads": THREADS,
            "worker_class": Worker,
            "accesslog": None,
            "loglevel": log_level.lower(),
            "graceful_timeout": 3,
            "proc_name": "pipeline-control",
            **LIMITS,
            **tls_options(pipeline.control),
        }
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> falcon.App:
        return get_app(self.pipeline, self.run_dir)

    def run(self) -> None:
        """Serve until SIGTERM (graceful: in-flight requests get `graceful_timeout`) or SIGINT/SIGQUIT.

        What gunicorn's arbiter would do for its one worker, minus forking and respawning: bind (the same
        retries), then run the worker here. The worker's parent is supervisord: it stops when that goes.
        PipelineErrors (e.g. an ipc path too long) reach the caller; any other failure to load the app
        exits 3 as the arbiter's "Worker failed to boot" did.
        """
        from gunicorn import sock
        from gunicorn.glogging import Logger

        warn_exposure(self.pipeline.control)
        log: Logger = self.cfg.logger_class(self.cfg)
        listeners = sock.create_sockets(self.cfg, log)  # exits 1 after its retries when the port stays taken
        log.info("Listening at: %s (%s)", ",".join(str(s) for s in listeners), os.getpid())
        worker = self.cfg.worker_class(1, os.getppid(), listeners, self, self.cfg.timeout / 2.0, self.cfg, log)
        worker.pid = os.getpid()
        try:
            worker.init_process()
        except (SystemExit, PipelineError):
            raise
        except Exception:
            if worker.booted:
                raise
            log.error("Worker failed to boot:\n%s", traceback.format_exc())
            sys.exit(3)  # gunicorn's WORKER_BOOT_ERROR
        finally:
            worker.tmp.close()
            for listener in listeners:  # the worker closes them on a normal stop; closing twice is harmless
                listener.close()
