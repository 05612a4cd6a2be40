"""CPU and RSS of a stack's processes, read from /proc while a benchmark runs (Linux only).

A stack's processes are found by their command line naming its run directory (supervisord's config and
every stage's `--run-dir`); each is labelled by its stage (`ingress`, `worker:RULE`, `egress`, ...).
CPU % is CPU time over wall time in the sampling window (100 % = one core); RSS is the peak, per label, of
the sum over that label's processes.
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class Usage:
    """CPU and resident memory of a group of processes between two readings of /proc."""

    procs: int
    cpu_pct: float
    rss_mib: float


def label(args: list[str]) -> str:
    """Stage of a stack process from its arguments: ingress, egress, control, worker:RULE, supervisord..."""
    if any(a.endswith("supervisord") for a in args):
        return "supervisord"
    for i, a in enumerate(args):
        # `python -m pipeline ...`, the `pipeline` script, or a forked worker's title (`pipeline worker ...`)
        if (a == "pipeline" and (i == 0 or args[i - 1] == "-m")) or a.endswith("/pipeline"):
            rest = args[i + 1:]
            if not rest:
                break
            if rest[0] == "worker" and "--rule" in rest[:-1]:
                return f"worker:{rest[rest.index('--rule') + 1]}"
            return rest[0]
    return "other"


def stack_processes(run_dir: Path) -> dict[int, str]:
    """pid -> label of every process whose command line names `run_dir`."""
    needle, out = str(run_dir), {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            args = (d / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(a == needle or a.startswith(needle + "/") for a in args):  # not /tmp/x-2 for /tmp/x
            out[int(d.name)] = label(args)
    return out


def read(pid: int) -> tuple[int, int] | None:
    """(CPU ticks user+system, RSS bytes) of a live process, None when it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        with open(f"/proc/{pid}/statm", "rb") as f:
            rss = int(f.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return None
    if fields[0] == b"Z":
        return None
    return int(fields[11]) + int(fields[12]), rss


class Sampler:
    """Samples the processes of a run directory (plus `extra` pid -> label) every `interval` seconds."""

    def __init__(self, run_dir: Path | None, extra: dict[int, str] | None = None, interval: float = 1.0) -> None:
        self.run_dir, self.extra, self.interval = run_dir, dict(extra or {}), interval
        self.first: dict[int, int] = {}
        self.last: dict[int, int] = {}
        self.labels: dict[int, str] = {}
        self.peak_rss: dict[str, int] = defaultdict(int)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-sampler", daemon=True)
        self.started = self.stopped = 0.0

    def add(self, pid: int, name: str) -> None:
        self.extra[pid] = name

    def start(self) -> Sampler:
        self.started = time.monotonic()
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> dict[str, Usage]:
        self._stop.set()
        self._thread.join()
        self.sample()
        self.stopped = time.monotonic()
        return self.usage()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        pids = stack_processes(self.run_dir) if self.run_dir else {}
        pids.update(self.extra)
        rss: dict[str, int] = defaultdict(int)
        for pid, name in pids.items():
            got = read(pid)
            if got is None:
                continue
            self.first.setdefault(pid, got[0])
            self.last[pid], self.labels[pid] = got[0], name
            rss[name] += got[1]
        for name, total in rss.items():
            self.peak_rss[name] = max(self.peak_rss[name], total)

    def usage(self) -> dict[str, Usage]:
        wall = max(self.stopped - self.started, 1e-9)
        out: dict[str, Usage] = {}
        for pid, name in sorted(self.labels.items(), key=lambda kv: _order(kv[1])):
            u = out.setdefault(name, Usage(0, 0.0, self.peak_rss[name] / 2**20))
            u.procs += 1
            u.cpu_pct += (self.last[pid] - self.first[pid]) / CLK_TCK / wall * 100
        return out


_ORDER = ("supervisord", "up", "broker", "ingress", "worker", "egress", "control", "loadgen", "bench")


def _order(name: str) -> tuple[int, str]:
    """Data-flow order: supervisord, broker, ingress, workers, egress, control, then the bench's own."""
    stage = name.split(":")[0].split(" ")[0]
    return (_ORDER.index(stage) if stage in _ORDER else len(_ORDER), name)
