"""The fork server's loop: fork each local worker, see each one end, fork it again alone; stop them on SIGTERM.

Invariants:
- signal handlers only queue the signal (and Python wakes the loop through the self-pipe); the loop calls
  `handle_<signal>`;
- a model's pool (`models.<model>.pool` processes serving its rules with `workers: shared`) has slots as a rule's
  workers do, under the name `<model>~pool`: forked, ended, forked again alone, spared and replaced the same way;
- every regular slot (a rule's worker `index`, 0 .. workers - 1) has a live worker or a fork due: a worker that
  ended is forked again alone, at once, or after a backoff that doubles while it keeps ending within QUICK seconds
  of its fork other than by WORKER_TIMEOUT or WORKER_RSS (those took a message: with a model that hangs on some
  messages, a fresh worker may meet one at once, and its slot must keep up); a spare (one per rule at most) is
  forked only when the control channel asks, never again;
- a regular worker that ends with one of FATAL_EXIT_CODES (its config or model will not load) ends the fork server
  with that code, once its reason is in `fatal/forkserver.txt` for `pipeline up`; a spare's does not (the reload
  that asked for it reads the reason and reports it);
- each worker leads a process group of its own, which is what the fork server signals (once): supervisord signals
  the fork server's group, which holds no worker;
- on SIGTERM every worker gets SIGTERM (it finishes its frame); those still there after the stop wait get SIGKILL.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import errors
from pipeline.config.schema.behaviour import pool_unit
from pipeline.stages import boot
from pipeline.stages.boot import Prepared, Resolved
from pipeline.stages.forkserver import child
from pipeline.stages.forkserver.channel import Channel, Refused
from pipeline.stages.worker import stage
from pipeline.supervision import run_dir as rundir
from pipeline.supervision.programs import STOP_WAIT
from pipeline.wire.endpoints import Endpoints

if TYPE_CHECKING:
    from pipeline.config.load import Config

log = logging.getLogger("pipeline.forkserver")

HANDLED = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
QUICK = 0.5  # a worker that ends within this many seconds of its fork ended "at once"
BACKOFF_FIRST, BACKOFF_MAX = 0.1, 2.0
SERVED = (errors.WORKER_TIMEOUT, errors.WORKER_RSS)  # exits of a worker that took messages: never backed off
EXITS_KEPT = 64

KILL_WAIT = 2.0  # seconds to reap the workers that got SIGKILL


@dataclass
class Slot:
    """One worker place: a rule's regular worker `index`, or its spare (`index` None)."""

    rule: str
    index: int | None
    pid: int = 0
    forked_at: float = 0.0
    quick_ends: int = 0
    due: float | None = None  # monotonic time of the next fork
    replacing: bool = False  # its worker was asked to stop to be forked again at once

    @property
    def name(self) -> str:
        return rundir.spare_slot(self.rule) if self.index is None else rundir.worker_slot(self.rule, self.index)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "rule": self.rule, "index": self.index, "pid": self.pid}


def describe_status(status: int) -> str:
    """An exit status in words: its named exit code, or the signal that ended the process."""
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    name = errors.EXIT_CODE_NAMES.get(code)
    return f"exit status {code}" + (f" ({name})" if name else "")


class ForkServer:
    """The workers of every rule of `cfg` (worker counts as overridden), forked from this process."""

    def __init__(self, args: argparse.Namespace, cfg: Config, run_dir: Path) -> None:
        self.args, self.cfg, self.run_dir = args, cfg, run_dir
        pools = {pool_unit(m): cfg.models[m].pool for m in cfg.pools()}  # a pool is served as a rule of its own
        self.rules = {r.name for r in cfg.rules} | set(pools)
        self.slots = {(r.name, i): Slot(r.name, i) for r in cfg.rules for i in range(r.workers)}
        self.slots.update({(unit, i): Slot(unit, i) for unit, n in pools.items() for i in range(n)})
        self.spares: dict[str, Slot] = {}
        self.by_pid: dict[int, Slot] = {}
        self.exits: deque[dict[str, Any]] = deque(maxlen=EXITS_KEPT)
        self.signals: list[int] = []
        self.stop_wait = max(r.timeout for r in cfg.rules) + STOP_WAIT
        self.stopping_until: float | None = None
        self.killed = False
        self.exit_code = errors.OK
        self.wake_read, self.wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.channel = Channel(run_dir / rundir.FORKSERVER_SOCKET, self.answer)
        self.ops = {"list": self.op_list, "start_spare": self.op_start_spare, "stop_spare": self.op_stop_spare,
                    "replace": self.op_replace}

    def run(self) -> int:
        """Fork every worker, then serve until stopped; return the exit code."""
        for sig in HANDLED:
            signal.signal(sig, lambda s, _f: self.signals.append(s))
        signal.set_wakeup_fd(self.wake_write)
        now = time.monotonic()
        for slot in self.slots.values():
            slot.due = now
        log.info("fork server: %d worker(s) of %d rule(s)", len(self.slots), len(self.rules))
        try:
            while not self._done():
                self._fork_due()
                self._wait()
                while self.signals:
                    name = signal.Signals(self.signals.pop(0)).name.removeprefix("SIG").lower()
                    getattr(self, f"handle_{name}")()
        finally:
            self.channel.close()
        return self.exit_code

    def _done(self) -> bool:
        if self.stopping_until is None:
            return False
        if not self.by_pid:
            return True
        now = time.monotonic()
        if now >= self.stopping_until and not self.killed:
            log.warning("%d worker(s) still running after %gs: SIGKILL", len(self.by_pid), self.stop_wait)
            self._signal_all(signal.SIGKILL)
            self.killed, self.stopping_until = True, now + KILL_WAIT
        return self.killed and now >= self.stopping_until

    def _wait(self) -> None:
        """Sleep until a signal, a control request or the next fork due (1 s at most)."""
        now, timeout = time.monotonic(), 1.0
        dues = [s.due for s in self.slots.values() if s.due is not None]
        if self.stopping_until is not None:
            dues.append(self.stopping_until)
        if dues:
            timeout = max(0.0, min(timeout, min(dues) - now))
        readers: list[Any] = [self.wake_read, *self.channel.readers()]
        readable, writable, _ = select.select(readers, self.channel.writers(), [], timeout)
        if self.wake_read in readable:
            try:
                while os.read(self.wake_read, 512):
                    pass
            except BlockingIOError:
                pass
        self.channel.serve(readable, writable)

    # ------------------------------------------------------------------------------------------------ signals

    def handle_chld(self) -> None:
        """A child ended: reap every one that did."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._ended(pid, status)

    def handle_term(self) -> None:
        """Stop: SIGTERM to every worker (it finishes its frame), SIGKILL to those left after the stop wait."""
        self._stop(errors.OK)

    def handle_int(self) -> None:
        """Stop, as on SIGTERM."""
        self._stop(errors.OK)

    def handle_hup(self) -> None:
        """Nothing to reload here: a hot reload comes through the control channel."""
        log.info("SIGHUP ignored: hot reload goes through `pipeline up` (SIGHUP) or POST /models/{name}/reload")

    def _stop(self, code: int) -> None:
        if self.stopping_until is not None:
            return
        log.info("stopping %d worker(s)", len(self.by_pid))
        self.exit_code = code
        self.stopping_until = time.monotonic() + self.stop_wait
        for slot in self.slots.values():
            slot.due = None
        self._signal_all(signal.SIGTERM)

    def _signal_all(self, sig: signal.Signals) -> None:
        for pid in list(self.by_pid):
            _signal(pid, sig)

    # ------------------------------------------------------------------------------------------ forks and ends

    def _fork_due(self) -> None:
        now = time.monotonic()
        due = [s for s in self.slots.values() if s.due is not None and s.due <= now and not s.pid]
        if due:
            prepare = Preparation(self.args, self.run_dir)
            for slot in due:
                self._fork(slot, prepare.worker(slot.rule))

    def _fork(self, slot: Slot, prepared: Prepared | None) -> int:
        """Fork a worker into `slot` (with its config and model folder when `prepared`); its pid (0: the fork
        failed, tried again later)."""
        spare = " (spare)" if slot.index is None else ""
        title = f"pipeline worker --rule {slot.rule} --run-dir {self.run_dir}{spare}"
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        try:
            pid = os.fork()
        except OSError as e:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            log.error("cannot fork %s: %s; trying again in %gs", slot.name, e, BACKOFF_MAX)
            slot.due = time.monotonic() + BACKOFF_MAX if slot.index is not None else None
            return 0
        if pid == 0:
            inherited = [self.wake_read, self.wake_write, *self.channel.fds()]
            child.become_worker(self.args, slot.rule, title, os.getppid(), inherited, mask, prepared)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        try:
            os.setpgid(pid, pid)  # the child does it too: whichever runs first
        except OSError:
            pass
        slot.pid, slot.forked_at, slot.due, slot.replacing = pid, time.monotonic(), None, False
        self.by_pid[pid] = slot
        log.info("forked %s (pid %d)", slot.name, pid)
        return pid

    def _ended(self, pid: int, status: int) -> None:
        slot = self.by_pid.pop(pid, None)
        if slot is None:
            return
        code = os.waitstatus_to_exitcode(status)
        self.exits.append({**slot.describe(), "pid": pid, "code": code if code >= 0 else None,
                           "signal": -code if code < 0 else None})
        lived = time.monotonic() - slot.forked_at
        log.log(logging.INFO if slot.replacing or self.stopping_until else logging.WARNING,
                "worker %s (rule %s, pid %d) ended after %.1fs: %s", slot.name, slot.rule, pid, lived,
                describe_status(status))
        if slot.pid == pid:
            slot.pid = 0
        if self.stopping_until is not None or slot.index is None:
            if self.spares.get(slot.rule) is slot:
                del self.spares[slot.rule]
            return
        if code in errors.FATAL_EXIT_CODES and not slot.replacing:
            self._fatal(slot, code)
            return
        self._again(slot, lived if code not in SERVED else QUICK)

    def _again(self, slot: Slot, lived: float) -> None:
        """Fork `slot` again: at once, or after a backoff when its workers keep ending at once."""
        slot.quick_ends = slot.quick_ends + 1 if lived < QUICK and not slot.replacing else 0  # QUICK: not at once
        delay = 0.0 if slot.quick_ends <= 1 else min(BACKOFF_FIRST * 2 ** (slot.quick_ends - 2), BACKOFF_MAX)
        if delay:
            log.warning("%s ended %d times in a row within %gs of its fork: next fork in %gs", slot.name,
                        slot.quick_ends, QUICK, delay)
        slot.due = time.monotonic() + delay

    def _fatal(self, slot: Slot, code: int) -> None:
        """A worker that cannot start: its reason under the fork server's name for `pipeline up`, then stop."""
        try:
            reason = rundir.read_fatal(rundir.fatal_file(self.run_dir, rundir.worker_program(slot.rule)))[1]
        except (OSError, ValueError):
            reason = f"it exited with status {code}"
        rundir.leave_fatal(self.run_dir, rundir.FORKSERVER_PROGRAM, code, f"worker {slot.name}: {reason}")
        log.error("worker %s cannot start: %s", slot.name, reason)
        self._stop(code)

    # --------------------------------------------------------------------------------------- control channel

    def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        """The fields of the answer to a control request (Refused: an error answer)."""
        op = self.ops.get(request["op"])
        if op is None:
            raise Refused(f"unknown op {request['op']!r:.80}: one of {', '.join(self.ops)}")
        return op(request)

    def op_list(self, request: dict[str, Any]) -> dict[str, Any]:
        """Every worker (of `rule`, when given) and the last ones that ended."""
        rule = request.get("rule")
        if rule is not None:
            self._rule(request)
        slots = [*self.slots.values(), *self.spares.values()]
        return {"workers": [s.describe() for s in slots if rule in (None, s.rule)],
                "exits": [e for e in self.exits if rule in (None, e["rule"])]}

    def op_start_spare(self, request: dict[str, Any]) -> dict[str, Any]:
        """Fork the rule's spare (stopping one still running first)."""
        rule = self._rule(request)
        self._running()
        self.op_stop_spare(request)
        slot = self.spares[rule] = Slot(rule, None)
        pid = self._fork(slot, Preparation(self.args, self.run_dir).worker(rule))
        if not pid:
            del self.spares[rule]
            raise Refused(f"cannot fork the spare worker of rule {rule} (see the fork server's log)")
        return {"pid": pid}

    def op_stop_spare(self, request: dict[str, Any]) -> dict[str, Any]:
        """SIGTERM to the rule's spare, if one runs."""
        slot = self.spares.pop(self._rule(request), None)
        if slot is None or not slot.pid:
            return {"pid": 0}
        _signal(slot.pid, signal.SIGTERM)
        return {"pid": slot.pid}

    def op_replace(self, request: dict[str, Any]) -> dict[str, Any]:
        """SIGTERM to a regular worker, forked again as soon as it ended (now when none runs)."""
        rule, index = self._rule(request), request.get("index")
        self._running()
        if type(index) is not int or (rule, index) not in self.slots:
            raise Refused(f"rule {rule} has no worker index {index!r:.40}")
        slot = self.slots[rule, index]
        slot.replacing, old = True, slot.pid
        if old:
            _signal(old, signal.SIGTERM)
        else:
            slot.due = time.monotonic()
        return {"pid": old}

    def _rule(self, request: dict[str, Any]) -> str:
        rule = request.get("rule")
        if not isinstance(rule, str) or rule not in self.rules:
            raise Refused(f"no rule {rule!r:.80} in this stack")
        return rule

    def _running(self) -> None:
        if self.stopping_until is not None:
            raise Refused("the fork server is stopping")


class Preparation:
    """What the workers forked in one turn of the loop take from the fork server rather than do themselves (each
    page a worker writes to is a page of its own): the config, read anew from the run dir (a hot reload rewrites
    its models) and the endpoints, once per turn, and each model's folder and version, resolved once per turn."""

    def __init__(self, args: argparse.Namespace, run_dir: Path) -> None:
        self.args, self.run_dir = args, run_dir
        self.cfg: Config | None = None
        self.endpoints: Endpoints | None = None
        self.models: dict[str, Resolved] = {}

    def worker(self, rule: str) -> Prepared | None:
        """The config and model of a worker of `rule`; None when that fails (the worker then does it itself, and
        fails as a standalone worker would, leaving its reason)."""
        try:
            if self.cfg is None or self.endpoints is None:
                self.cfg = boot.stage_config(self.args, self.run_dir)
                self.endpoints = Endpoints.for_config(self.cfg, self.run_dir)
            served = boot.served_rules(self.cfg, rule)
            model = served[0].model
            if model not in self.models:
                self.models[model] = stage.resolve(self.cfg, served[0].name)
            return Prepared(self.cfg, self.run_dir, self.models[model], self.endpoints)
        except Exception as e:  # any failure is the worker's to report
            log.debug("the worker of rule %s prepares itself: %s", rule, e)
            return None


def _signal(pid: int, sig: signal.Signals) -> None:
    """Signal a worker's process group (the worker, and what its model started)."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        try:
            os.kill(pid, sig)  # it has not made its group yet
        except ProcessLookupError:
            pass
