"""The worker stage: PULL messages of one rule, call the model, PUSH one Result per message to egress.

A watchdog thread enforces the rule's timeout: when a model call runs longer, the watchdog sends the
error record on its own socket and ends the process with WORKER_TIMEOUT, so supervisord starts a fresh
worker (a hung C extension cannot be interrupted any other way).
"""

from __future__ import annotations

import logging
import os
import threading
import time

import zmq

from pipeline import envelope, model
from pipeline.config import Config
from pipeline.endpoints import Endpoints
from pipeline.errors import WORKER_TIMEOUT
from pipeline.stats import Reporter
from pipeline.workers.process import Processor

log = logging.getLogger(__name__)

RCVHWM = 256  # small: what sits in a worker's pipe is lost if it dies (until in-flight tracking lands)


def load(cfg: Config, rule_name: str, cache_dir: os.PathLike[str]) -> Processor:
    """Import the rule's model and run its init(); raise ModelLoadError on failure."""
    rule = cfg.rule(rule_name)
    spec = cfg.models[rule.model]
    loaded = model.load(rule.model, spec.path, cache_dir)
    ctx = model.Context(rule.name, rule.model, dict(spec.params), logging.getLogger(f"model.{rule.model}"))
    model.run_init(loaded, ctx)
    proc = Processor(rule, loaded, ctx)
    log.info("model %s loaded from %s (sha256 %s)", rule.model, loaded.folder, loaded.sha256[:12])
    return proc


def run(cfg: Config, rule_name: str, eps: Endpoints, stop: threading.Event, proc: Processor) -> None:
    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, RCVHWM)
    pull.connect(eps.rule(cfg.rule_index(rule_name)))
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 5000)
    push.connect(eps.results())
    stats = Reporter(ctx, eps.stats(), "rule", rule_name)
    stats.head.update(model=proc.model.name, sha256=proc.model.sha256, source=str(proc.model.folder),
                      loaded_at=proc.loaded_at)
    threading.Thread(target=_watchdog, args=(proc, eps, stop), daemon=True, name="watchdog").start()
    try:
        while not stop.is_set():
            stats.tick()
            if not pull.poll(200):
                continue
            results = proc.run_batch(envelope.decode(pull.recv(), envelope.Message))
            push.send(envelope.encode(results))
            stats.count("received", len(results))
            for r in results:
                stats.count("errors" if r.kind == envelope.ERROR else "processed")
                stats.observe("call", r.latency)
    finally:
        stats.close()
        pull.close(linger=0)
        push.close()


def _watchdog(proc: Processor, eps: Endpoints, stop: threading.Event) -> None:
    limit = proc.rule.timeout
    while not stop.wait(min(0.1, limit / 10)):
        started, msg = proc.call_started, proc.current
        if not started or msg is None or time.monotonic() - started < limit:
            continue
        results = proc.abandon(f"timeout after {limit:g}s")
        sock = zmq.Context.instance().socket(zmq.PUSH)  # this thread's own socket
        sock.connect(eps.results())
        sock.send(envelope.encode(results))
        sock.close(linger=2000)
        logging.getLogger(__name__).error("model call passed %gs: worker exits to be replaced", limit)
        os._exit(WORKER_TIMEOUT)
