"""The fork server stage (`pipeline forkserver`): one supervisord program that forks every local worker of the stack.

It imports once what a worker runs (PRELOADED), freezes those objects out of the garbage collector's reach
(gc.freeze: a collection in a worker then never writes to the pages it shares with the fork server), and forks each
worker, which shares those pages copy-on-write. Before forking it creates no ZeroMQ context, thread or socket
besides its control channel: a worker makes its own after the fork. `arbiter` is the loop, `child` what a worker
does first, `channel` the control socket hot reloads use.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.stages import boot
from pipeline.stages.forkserver.arbiter import ForkServer

if TYPE_CHECKING:
    from pipeline.config.load import Config

log = logging.getLogger("pipeline.forkserver")

M_ARENA_MAX = -8  # glibc's mallopt parameter

PRELOADED = (  # what a worker imports on its way to its first message, its model aside
    "zmq", "msgpack", "orjson", "json", "ctypes", "pipeline.stages.worker", "pipeline.stages.worker.stage",
    "pipeline.stages.worker.process", "pipeline.models.loader", "pipeline.models.codec", "pipeline.models.filters",
    "pipeline.models.packages", "pipeline.models.packages.cache", "pipeline.models.packages.archive", "tarfile",
    "pipeline.telemetry.reporter", "pipeline.wire.frames", "pipeline.wire.endpoints",
    "pipeline.wire.sockets", "pipeline.config.snapshot", "pipeline.keyed.keys",
)


def preload() -> None:
    """Import PRELOADED (a module missing from this installation is skipped)."""
    for name in PRELOADED:
        try:
            importlib.import_module(name)
        except ImportError as e:
            log.debug("not preloaded: %s (%s)", name, e)


def one_malloc_arena() -> None:
    """Let every thread of a worker (main, watchdog, ZeroMQ's I/O and reaper) allocate from glibc's main arena:
    an arena per thread costs each worker pages of its own, for no gain at a worker's few threads."""
    try:
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, 1)
    except (OSError, AttributeError) as e:  # not glibc
        log.debug("mallopt unavailable: %s", e)


def main(args: argparse.Namespace) -> int:
    """`pipeline forkserver`: every local worker of the stack, forked from this process; its exit code."""
    return boot.run_stage("forkserver", args, lambda cfg, rd: run(args, cfg, rd))


def run(args: argparse.Namespace, cfg: Config, run_dir: Path) -> int:
    """Preload, freeze, fork every local worker and keep them running until SIGTERM; return the exit code."""
    preload()
    one_malloc_arena()
    server = ForkServer(args, cfg, run_dir)
    gc.collect()
    gc.freeze()
    return server.run()
