"""The worker stage: take frames of one rule from ingress, call the model, PUSH one Result per message.

Flow control is by credit: the worker's DEALER tells ingress how many messages it may send (PREFETCH to
start, then what each frame used, once its results are on their way to egress). So ingress always knows
which worker holds which message, and a dead worker's messages can be dispatched again.

A watchdog thread, with sockets of its own, sends a heartbeat to ingress twice a second and enforces the
rule's timeout: past it, it sends what the frame produced so far, tells ingress which message timed out,
and ends the process with WORKER_TIMEOUT so supervisord starts a fresh worker (a hung C extension cannot
be interrupted any other way). A worker above the rule's `max_rss` finishes its frame and exits the same
way with WORKER_RSS.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import zmq

from pipeline.config.schema.behaviour import SHADOW
from pipeline.errors import WORKER_RSS, WORKER_TIMEOUT
from pipeline.models import loader, packages
from pipeline.stages.worker.process import Processor
from pipeline.telemetry.reporter import Reporter, process_usage
from pipeline.wire import frames
from pipeline.wire.endpoints import Endpoints
from pipeline.wire.sockets import drain

if TYPE_CHECKING:  # pipeline.config.load loads pydantic; a stage gets its config from pipeline.config.snapshot
    from pipeline.config.load import Config

log = logging.getLogger("pipeline.workers.stage")  # a stable name for log filters, not the module path

PREFETCH = frames.PREFETCH  # messages a worker may hold: one frame in the model, the next one waiting
BEAT = 0.5
COALESCE_AFTER = 0.001  # seconds of model time per pass above which the worker batches what waits (see _take)
SHADOW_NICENESS = 10  # added to a shadow worker's nice value


def resolve(cfg: Config, rule_name: str) -> tuple[Path, str]:
    """The folder of the rule's model (a cached, verified version is used without network; a missing one is
    downloaded) and its version: the sha256 of the archive it came from (of the folder's files for a folder used
    in place). ModelLoadError on failure."""
    rule = cfg.rule(rule_name)
    folder = packages.resolve(rule.model, cfg.models[rule.model].source, cfg.default_data_dir(), cfg.packages.limits())
    return folder, packages.version_of(folder)


def load(cfg: Config, rule_name: str, resolved: tuple[Path, str] | None = None) -> Processor:
    """Import the rule's model (`resolved`: its folder and version, else `resolve`d here) and run its init();
    raise ModelLoadError on failure."""
    rule = cfg.rule(rule_name)
    spec = cfg.models[rule.model]
    folder, version = resolved or resolve(cfg, rule_name)
    loaded = loader.load(rule.model, folder, version)
    ctx = loader.Context(rule.name, rule.model, dict(spec.params), logging.getLogger(f"model.{rule.model}"))
    loader.run_init(loaded, ctx)
    log.info("model %s loaded from %s (sha256 %s)", rule.model, loaded.folder, loaded.sha256[:12])
    return Processor(rule, loaded, ctx)


def run(cfg: Config, rule_name: str, eps: Endpoints, stop: threading.Event, proc: Processor) -> int:
    """Serve the rule until `stop` is set; return the exit code (OK, or WORKER_RSS). A shadow's worker runs at a
    lower CPU priority (SHADOW_NICENESS): on a busy box the live version's processes are scheduled first."""
    index = cfg.rule_index(rule_name)
    if proc.rule.trial == SHADOW:
        os.nice(SHADOW_NICENESS)
    ident = f"{os.uname().nodename}-{os.getpid()}-{os.urandom(2).hex()}"  # unique across boxes too
    ctx = zmq.Context.instance()
    dealer = eps.connect(ctx, zmq.DEALER, "rule", index, {zmq.IDENTITY: ident.encode(), zmq.LINGER: 0})
    push = eps.connect(ctx, zmq.PUSH, "results", options={zmq.LINGER: 5000})
    stats = Reporter.connect(eps, "rule", rule_name)
    stats.head.update(model=proc.model.name, sha256=proc.model.sha256, source=str(proc.model.folder),
                      loaded_at=proc.loaded_at)
    watchdog = Watchdog(proc, eps, ident, index, stop)
    threading.Thread(target=watchdog.run, daemon=True, name="watchdog").start()
    dealer.send(frames.pack([frames.CREDIT, PREFETCH]))
    try:
        return _serve(proc, dealer, push, stats, watchdog, stop)
    finally:
        stats.close()
        dealer.close()
        push.close()


def _serve(proc: Processor, dealer: zmq.Socket, push: zmq.Socket, stats: Reporter, watchdog: Watchdog,
           stop: threading.Event) -> int:
    max_rss, slow = proc.rule.max_rss, False
    while not stop.is_set():
        stats.tick()
        if not dealer.poll(200):
            continue
        batch = _take(dealer, slow)
        watchdog.holding += len(batch)
        started = time.monotonic()
        results = proc.run_batch(batch)
        slow = time.monotonic() - started >= COALESCE_AFTER
        push.send(frames.encode(results, watchdog.ident))
        for done in range(0, len(batch), PREFETCH):  # a credit is at most PREFETCH (ingress checks it)
            dealer.send(frames.pack([frames.CREDIT, min(PREFETCH, len(batch) - done)]))
        watchdog.holding -= len(batch)
        stats.count("received", len(results))
        for r in results:
            stats.count("errors" if r.kind == frames.ERROR else "processed")
            stats.observe("call", r.latency)
        if proc.filtered:
            stats.counters["filtered"] = proc.filtered  # messages the rule's filter refused (among "processed")
        if max_rss and process_usage()["rss_bytes"] > max_rss:
            log.warning("RSS above max_rss (%d bytes): worker exits to be replaced", max_rss)
            return WORKER_RSS
    return 0


def _take(dealer: zmq.Socket, everything: bool) -> list[frames.Message]:
    """The next frame; with `everything`, every frame waiting now, as one batch (one result frame and one
    credit then answer them all: fewer wake-ups in ingress, egress and ZeroMQ's I/O threads). The stage
    asks for everything after a pass of the model that took COALESCE_AFTER or more: a slow model falling
    behind. A fast one answers each frame at once: looking for more frames on an empty socket cost ~1 ms
    of p50 latency at 1,000 msg/s."""
    if not everything:
        return frames.decode(dealer.recv(), frames.Message)
    batch: list[frames.Message] = []
    for frame in drain(dealer, limit=PREFETCH):
        batch += frames.decode(frame, frames.Message)
    return batch


class Watchdog:
    """Heartbeats and the per-call timeout, on this thread's own sockets."""

    def __init__(self, proc: Processor, eps: Endpoints, ident: str, index: int, stop: threading.Event) -> None:
        self.proc, self.eps, self.ident, self.index, self.stop = proc, eps, ident, index, stop
        self.holding = 0  # messages received and not yet answered (read here, written by the main thread)

    def run(self) -> None:
        beats = self.eps.connect(zmq.Context.instance(), zmq.PUSH, "beats", options={zmq.LINGER: 1000, zmq.SNDHWM: 10})
        limit, next_beat = self.proc.rule.timeout, 0.0
        try:
            while not self.stop.wait(min(0.05, limit / 10)):
                now = time.monotonic()
                if now >= next_beat:
                    next_beat = now + BEAT
                    self._send(beats, [self.ident, self.index, frames.BEAT, max(0, PREFETCH - self.holding)])
                started = self.proc.call_started  # read once: the main thread zeroes it when the call ends
                if started and now - started >= limit:
                    self._expire(beats, limit)
        finally:
            beats.close()

    def _send(self, sock: zmq.Socket, obj: list) -> None:
        try:
            sock.send(frames.pack(obj), zmq.NOBLOCK)
        except zmq.Again:
            pass

    def _expire(self, beats: zmq.Socket, limit: float) -> None:
        """Tell egress what is answered, and ingress which message timed out (none in a handler_batch call of
        several: ingress then sends each again alone, one attempt more); then exit."""
        culprit, where = self.proc.culprit, self.proc.call_name
        results = self.proc.abandon(f"timeout after {limit:g}s")
        answered = [r.message_id for r in results]  # ingress need not send these again
        sock = self.eps.connect(zmq.Context.instance(), zmq.PUSH, "results")
        # os._exit skips zmq's linger: wait until libzmq has written each frame out (tracker) before leaving;
        # copy_threshold 0, or pyzmq copies small frames and hands back a tracker that is already done
        sock.copy_threshold = beats.copy_threshold = 0
        sent = [sock.send(frames.encode(results, self.ident), copy=False, track=True),
                beats.send(frames.pack([self.ident, self.index, frames.TIMEOUT,
                                          [culprit.id if culprit else None, answered]]),
                           copy=False, track=True)]
        for tracker in sent:
            try:
                tracker.wait(2.0)
            except zmq.NotDone:
                pass
        time.sleep(0.1)  # "done" means libzmq let go of the buffer, not that its I/O thread wrote it out
        log.error("model call passed %gs on %s: worker exits to be replaced", limit, where)
        os._exit(WORKER_TIMEOUT)
