"""What a forked worker does before it runs the worker stage: let go of the fork server, then serve its rule.

Invariants: the child closes every descriptor of the fork server it inherited (control channel, self-pipe) and
restores default signal handling before it unblocks signals, so nothing meant for the fork server runs in it; it
dies with the fork server (PR_SET_PDEATHSIG, checked against a parent that died before it was set); it runs with
the config the fork server read from the run directory just before the fork (a hot reload rewrites the models
there) and the model folder and version it resolved (else it reads and resolves them itself); and it leaves only
through `os._exit`, never through the fork server's frames.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import NoReturn

from pipeline.stages import boot
from pipeline.stages.boot import Prepared

log = logging.getLogger("pipeline.forkserver")

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
try:  # looked up in the fork server when it imports this module: a worker that did it would hold the pages
    PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux with a C library that has prctl
    PRCTL = None
FLUSH_WAIT = 6.0  # seconds a leaving worker gives ZeroMQ to write out its last results (push LINGER is 5 s)


def become_worker(args: argparse.Namespace, rule: str, title: str, parent: int, inherited: Iterable[int],
                  mask: set[signal.Signals], prepared: Prepared | None) -> NoReturn:
    """Run in the child right after the fork: serve `rule` as a worker (with the config and model folder the fork
    server `prepared`, else finding them itself), then exit with its code."""
    code = 1
    try:
        code = _serve(args, rule, title, parent, inherited, mask, prepared)
    except BaseException:  # noqa: B036 - nothing may unwind into the fork server's loop
        try:
            log.exception("worker of rule %s failed", rule)
        except BaseException:  # noqa: B036
            pass
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _serve(args: argparse.Namespace, rule: str, title: str, parent: int, inherited: Iterable[int],
           mask: set[signal.Signals], prepared: Prepared | None) -> int:
    for sig in (signal.SIGCHLD, signal.SIGHUP):  # SIGTERM and SIGINT: stop_event's, below, before any comes in
        signal.signal(sig, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)
    for fd in inherited:
        try:
            os.close(fd)
        except OSError:
            pass
    os.setpgid(0, 0)  # the fork server signals this group: the worker and whatever its model started
    _die_with(parent)
    set_title(title)
    stop = boot.stop_event()
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    worker_args = argparse.Namespace(**{**vars(args), "rule": rule, "connect": None, "key": None,
                                        "server_key": None})
    try:
        return boot.run_stage("worker", worker_args, boot.worker_body(worker_args, stop, prepared), prepared)
    finally:
        stop.set()  # the watchdog thread closes its socket
        _flush()


def _die_with(parent: int) -> None:
    """SIGKILL this process when the fork server dies; exit now if it already did."""
    if PRCTL is None:
        log.warning("prctl unavailable: this worker may outlive its fork server")
    elif PRCTL(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    if os.getppid() != parent:
        os._exit(1)


def set_title(title: str) -> None:
    """Show `title` (words separated by spaces) as this process's command line in /proc/PID/cmdline and ps, by
    writing over the original arguments (never past them); its name (comm) becomes `pipeline-worker`."""
    try:
        if PRCTL is not None:
            PRCTL(PR_SET_NAME, b"pipeline-worker", 0, 0, 0)
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end (fields 48 and 49 of stat)
    except (OSError, AttributeError, ValueError, IndexError):
        return
    size = end - start
    if size <= 1:
        return
    text = title.replace(" ", "\0").encode()[: size - 1]
    ctypes.memmove(start, text.ljust(size, b"\0"), size)


def _flush() -> None:
    """Give ZeroMQ up to FLUSH_WAIT to send what the sockets still hold (os._exit would drop it)."""
    zmq = sys.modules.get("zmq")
    context = getattr(getattr(zmq, "Context", None), "_instance", None) if zmq else None
    if context is None:
        return
    ender = threading.Thread(target=context.term, daemon=True, name="flush")
    ender.start()
    ender.join(FLUSH_WAIT)
