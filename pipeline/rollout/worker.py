"""A replay worker: one process that runs one model version on frames the way a stack's worker does.

It loads the model with `models.loader` (its `init` run with the `Context` the stack would give it), calls it
through the stage's own `Processor` (one call per message, or `handler_batch` per frame; a message on its second
attempt or later alone; the filter, the codec, error records), and a watchdog thread enforces the rule's
`timeout` per call as the stage's does: past it, the worker sends what the frame produced so far (QoS 0 messages
it will not get to as `timeout` / `not_processed` records: `Processor.abandon`) and the message to blame (none in
a `handler_batch` call of several), then exits with WORKER_TIMEOUT. What differs from a stage worker: frames come
over a multiprocessing pipe from `rollout.replay`, not over ZeroMQ from ingress, and there are no heartbeats.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import WORKER_TIMEOUT, ModelLoadError
from pipeline.models import loader
from pipeline.stages.worker.process import Processor

if TYPE_CHECKING:
    from pipeline.config.load import Rule

READY, FAILED, RESULTS, TIMEOUT = "ready", "failed", "results", "timeout"


def serve(conn: Connection, rule: Rule, model: str, folder: Path, params: dict[str, Any]) -> None:
    """The process's life: load, say READY (or FAILED and why), then answer each frame until None."""
    os.dup2(2, 1)  # what a model prints goes to stderr: stdout carries the report (--json)
    logging.basicConfig(level=logging.ERROR)  # a model's own warnings would drown the report
    try:
        loaded = loader.load(model, folder)
        ctx = loader.Context(rule.name, model, dict(params), logging.getLogger(f"model.{model}"))
        loader.run_init(loaded, ctx)
    except ModelLoadError as e:
        conn.send((FAILED, str(e)))
        return
    proc = Processor(rule, loaded, ctx)
    lock = threading.Lock()
    threading.Thread(target=_watchdog, args=(proc, conn, lock, rule.timeout), daemon=True, name="watchdog").start()
    conn.send((READY, loaded.sha256))
    while True:
        batch = conn.recv()
        if batch is None:
            return
        results = proc.run_batch(batch)
        with lock:
            conn.send((RESULTS, results))


def _watchdog(proc: Processor, conn: Connection, lock: threading.Lock, limit: float) -> None:
    while True:
        time.sleep(min(0.05, limit / 10))
        started = proc.call_started  # read once: the main thread zeroes it when the call ends
        if started and time.monotonic() - started >= limit:
            with lock:
                if not proc.call_started:
                    continue
                culprit = proc.culprit
                results = proc.abandon(f"timeout after {limit:g}s")
                conn.send((TIMEOUT, (culprit.id if culprit else None, results)))
                os._exit(WORKER_TIMEOUT)
