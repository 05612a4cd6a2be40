"""The worker stage: take frames of a rule from ingress, call the model, PUSH one Result per message.

A worker serves one rule, or (a pool process, `<model>~pool`) every rule of its model that says `workers: shared`.
Each rule it serves is a `Lane`: a Processor with that rule's own Context (init() ran once per rule), a DEALER to
that rule's ROUTER with an identity and credit of its own, a heartbeat of its own, and a stats snapshot under the
rule's name. So to ingress and to the stats board a pool process is, per rule, just one more worker of that rule: a
rule's dispatch, in-flight tracking, timeouts and re-sends, and its counters in /stages, are those of dedicated
workers. The lanes share the model, the results PUSH, the stats PUB socket and the watchdog; one model call runs at
a time, and the watchdog holds it to its own rule's timeout.

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
from dataclasses import dataclass
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
    from pipeline.config.load import Config, Rule

log = logging.getLogger("pipeline.workers.stage")  # a stable name for log filters, not the module path

PREFETCH = frames.PREFETCH  # messages a worker may hold: one frame in the model, the next one waiting
BEAT = 0.5
COALESCE_AFTER = 0.001  # seconds of model time per pass above which the worker batches what waits (see _take)
SHADOW_NICENESS = 10  # added to a shadow worker's nice value
ELSEWHERE = ""  # the culprit a TIMEOUT names for the other lanes of a pool process: no message of theirs


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
    return load_pool(cfg, [cfg.rule(rule_name)], resolved)[0]


def load_pool(cfg: Config, rules: list[Rule], resolved: tuple[Path, str] | None = None) -> list[Processor]:
    """Import the model of `rules` (one model) once and run its init() once per rule, each with a Context of its own
    (the rule's name, the model's params): a Processor per rule, in order. ModelLoadError on failure."""
    name = rules[0].model
    spec = cfg.models[name]
    folder, version = resolved or resolve(cfg, rules[0].name)
    loaded = loader.load(name, folder, version)
    procs = []
    for rule in rules:
        ctx = loader.Context(rule.name, name, dict(spec.params), logging.getLogger(f"model.{name}"))
        loader.run_init(loaded, ctx)
        procs.append(Processor(rule, loaded, ctx))
    log.info("model %s loaded from %s (sha256 %s) for %d rule(s)", name, loaded.folder, loaded.sha256[:12],
             len(rules))
    return procs


@dataclass(eq=False)
class Lane:
    """One rule a worker process serves: its Processor, its DEALER to the rule's ROUTER (identity `ident`, credit of
    its own), its stats (a snapshot under the rule's name) and the messages it holds (read by the watchdog)."""

    proc: Processor
    index: int
    ident: str
    dealer: zmq.Socket
    stats: Reporter
    holding: int = 0  # messages received and not yet answered
    slow: bool = False  # the last pass through the model took COALESCE_AFTER or more


def run(cfg: Config, rule_name: str, eps: Endpoints, stop: threading.Event, proc: Processor) -> int:
    """Serve the rule until `stop` is set; return the exit code (OK, or WORKER_RSS)."""
    return run_lanes(cfg, eps, stop, [proc])


def run_lanes(cfg: Config, eps: Endpoints, stop: threading.Event, procs: list[Processor], pool: str | None = None
              ) -> int:
    """Serve the rules of `procs` (a dedicated worker: one; a pool process, named `pool`: each rule of its model) until
    `stop` is set; return the exit code (OK, or WORKER_RSS). A shadow's worker runs at a lower CPU priority
    (SHADOW_NICENESS): on a busy box the live version's processes are scheduled first."""
    if any(p.rule.trial == SHADOW for p in procs):
        os.nice(SHADOW_NICENESS)
    ctx = zmq.Context.instance()
    push = eps.connect(ctx, zmq.PUSH, "results", options={zmq.LINGER: 5000})
    room = {zmq.SNDHWM: Reporter.OPTIONS[zmq.SNDHWM] * len(procs)}  # every lane's snapshots, on one socket
    pub = eps.connect(ctx, zmq.PUB, "stats", options={**Reporter.OPTIONS, **room})
    lanes = [_lane(cfg, eps, ctx, pub, proc, pool) for proc in procs]
    watchdog = Watchdog(lanes, eps, stop)
    threading.Thread(target=watchdog.run, daemon=True, name="watchdog").start()
    try:
        return _serve(lanes, push, watchdog, stop)
    finally:
        for lane in lanes:
            lane.stats.tick(force=True)
            lane.dealer.close()
        pub.close()
        push.close()


def _lane(cfg: Config, eps: Endpoints, ctx: zmq.Context, pub: zmq.Socket, proc: Processor, pool: str | None) -> Lane:
    """Connect a lane for `proc`'s rule and give ingress its first credit."""
    index = cfg.rule_index(proc.rule.name)
    ident = f"{os.uname().nodename}-{os.getpid()}-{os.urandom(2).hex()}"  # unique across boxes too
    dealer = eps.connect(ctx, zmq.DEALER, "rule", index, {zmq.IDENTITY: ident.encode(), zmq.LINGER: 0})
    stats = Reporter(pub, "rule", proc.rule.name)
    stats.head.update(model=proc.model.name, sha256=proc.model.sha256, source=str(proc.model.folder),
                      loaded_at=proc.loaded_at)
    if pool is not None:
        stats.head["pool"] = pool
    dealer.send(frames.pack([frames.CREDIT, PREFETCH]))
    return Lane(proc, index, ident, dealer, stats)


def _serve(lanes: list[Lane], push: zmq.Socket, watchdog: Watchdog, stop: threading.Event) -> int:
    poller = zmq.Poller()
    for lane in lanes:
        poller.register(lane.dealer, zmq.POLLIN)
    max_rss = min((r for r in (lane.proc.rule.max_rss for lane in lanes) if r), default=None)
    while not stop.is_set():
        for lane in lanes:
            lane.stats.tick()
        ready = dict(poller.poll(200))
        if not ready:
            continue
        for lane in lanes:
            if lane.dealer in ready:
                _answer(lane, push, watchdog)
        if max_rss and process_usage()["rss_bytes"] > max_rss:
            log.warning("RSS above max_rss (%d bytes): worker exits to be replaced", max_rss)
            return WORKER_RSS
    return 0


def _answer(lane: Lane, push: zmq.Socket, watchdog: Watchdog) -> None:
    """Take the lane's next frame (or every frame waiting, after a slow pass), call the model, send the results and
    the credit back."""
    proc, dealer, stats = lane.proc, lane.dealer, lane.stats
    batch = _take(dealer, lane.slow)
    lane.holding += len(batch)
    watchdog.calling = lane
    started = time.monotonic()
    results = proc.run_batch(batch)
    lane.slow = time.monotonic() - started >= COALESCE_AFTER
    push.send(frames.encode(results, lane.ident))
    for done in range(0, len(batch), PREFETCH):  # a credit is at most PREFETCH (ingress checks it)
        dealer.send(frames.pack([frames.CREDIT, min(PREFETCH, len(batch) - done)]))
    lane.holding -= len(batch)
    stats.count("received", len(results))
    for r in results:
        stats.count("errors" if r.kind == frames.ERROR else "processed")
        stats.observe("call", r.latency)
    if proc.filtered:
        stats.counters["filtered"] = proc.filtered  # messages the rule's filter refused (among "processed")


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
    """Heartbeats of every lane and the timeout of the model call in progress (its rule's), on this thread's own
    sockets."""

    def __init__(self, lanes: list[Lane], eps: Endpoints, stop: threading.Event) -> None:
        self.lanes, self.eps, self.stop = lanes, eps, stop
        self.calling: Lane = lanes[0]  # the lane whose frame the main thread is (or was last) on

    def run(self) -> None:
        beats = self.eps.connect(zmq.Context.instance(), zmq.PUSH, "beats",
                                 options={zmq.LINGER: 1000, zmq.SNDHWM: 10 * len(self.lanes)})
        shortest, next_beat = min(lane.proc.rule.timeout for lane in self.lanes), 0.0
        try:
            while not self.stop.wait(min(0.05, shortest / 10)):
                now = time.monotonic()
                if now >= next_beat:
                    next_beat = now + BEAT
                    for lane in self.lanes:
                        self._send(beats, [lane.ident, lane.index, frames.BEAT, max(0, PREFETCH - lane.holding)])
                lane = self.calling
                started = lane.proc.call_started  # read once: the main thread zeroes it when the call ends
                if started and now - started >= lane.proc.rule.timeout:
                    self._expire(beats, lane)
        finally:
            beats.close()

    def _send(self, sock: zmq.Socket, obj: list) -> None:
        try:
            sock.send(frames.pack(obj), zmq.NOBLOCK)
        except zmq.Again:
            pass

    def _expire(self, beats: zmq.Socket, lane: Lane) -> None:
        """Tell egress what is answered, and ingress which message timed out (none in a handler_batch call of
        several: ingress then sends each again alone, one attempt more); then exit. The other lanes of a pool
        process tell ingress that their rule's culprit is ELSEWHERE: the messages they hold were never called, and
        go again as they were, without losing an attempt."""
        proc, limit = lane.proc, lane.proc.rule.timeout
        culprit, where = proc.culprit, proc.call_name
        results = proc.abandon(f"timeout after {limit:g}s")
        answered = [r.message_id for r in results]  # ingress need not send these again
        sock = self.eps.connect(zmq.Context.instance(), zmq.PUSH, "results")
        # os._exit skips zmq's linger: wait until libzmq has written each frame out (tracker) before leaving;
        # copy_threshold 0, or pyzmq copies small frames and hands back a tracker that is already done
        sock.copy_threshold = beats.copy_threshold = 0
        sent = [sock.send(frames.encode(results, lane.ident), copy=False, track=True),
                beats.send(frames.pack([lane.ident, lane.index, frames.TIMEOUT,
                                          [culprit.id if culprit else None, answered]]),
                           copy=False, track=True)]
        sent += [beats.send(frames.pack([other.ident, other.index, frames.TIMEOUT, [ELSEWHERE, []]]), copy=False,
                            track=True) for other in self.lanes if other is not lane]
        for tracker in sent:
            try:
                tracker.wait(2.0)
            except zmq.NotDone:
                pass
        time.sleep(0.1)  # "done" means libzmq let go of the buffer, not that its I/O thread wrote it out
        log.error("model call of rule %s passed %gs on %s: worker exits to be replaced", proc.rule.name, limit, where)
        os._exit(WORKER_TIMEOUT)
