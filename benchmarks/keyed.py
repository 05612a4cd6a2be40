"""What a rule's `key:` costs: the same rule unkeyed, keyed, and keyed with a model writing `context.state`, at
each worker count, with a trivial model and with a 1 ms CPU model; QoS 1 in and out, 1,000 devices.

    python benchmarks/keyed.py --workers 2 4 [--models trivial burn] [--modes unkeyed keyed state]
        [--devices 1000] [--duration 6] [--json OUT] [--no-micro]

Starts its own Mosquitto on 127.0.0.1:18842 (`max_queued_messages 0`: no per-client queue limit, see below) and,
per (model, workers, mode), a fresh stack (`pipeline up`, its own run and data directories, so each stack's
state starts empty) of one rule `r`: `kb/+/in` -> `kb/{1}/out`, QoS 1 both ways, `key: "{1}"` (the device) in
the keyed modes. On each stack, with the bench's own parts (`pipeline loadgen` as a subprocess, the bench's
`Receiver`, `Sampler` and `analyse`):

1. a warm-up (1 s at the paced rate, not reported);
2. a paced run at a rate below every mode's capacity (`--paced-*`): latency p50 / p99, and each stage's CPU per
   message (`/proc/PID/task/*/schedstat`, nanoseconds), so egress's CPU per message with and without state
   writes is compared at the same rate;
3. a saturating run: a fixed offered load above the stack's capacity (`--saturate-*`); its throughput is the
   capacity: `cmt/s`, results egress committed per second while loadgen still sends, from 1 s after the run's
   first commit (`Commits`, `committed_rate`: the outbox's AUTOINCREMENT counter read every 0.1 s). What the
   receiver sees (`thru/s`, first receipt to last, as `pipeline bench` reports it) is not the stack's rate
   under overload: Mosquitto, one thread on the shared cores, forwards the results late and then in a burst
   after the last send, and the drain then runs on the cores loadgen no longer takes. `ratio` = keyed `cmt/s` /
   unkeyed `cmt/s` of the same model and workers. Mosquitto queues what the stack has not taken
   yet without limit, so no message is lost and one run per stack measures its capacity; a search for the
   highest zero-loss rate would need several runs per stack (12 stacks) and, with Mosquitto's default queue of
   1,000, measures where the broker starts dropping rather than what the stack carries. A run counts as
   saturated when it delivered less than 95 % of what was offered.

Every run also checks order and state from the results: per device, a result whose seq is below one already
received is out of order (expected without a key and several workers, never with one), and in the state mode
each device's `n` must go 1, 2, 3... across the stack's runs.

Then (unless --no-micro) the outbox's part alone (`micro`): `Outbox.commit` of frames of 1, 8 and 32 results,
unkeyed, keyed with the state unchanged, and keyed with a state written, `synchronous=full`, as `outbox_sync.py`
times `add`.
Run it from the checkout (`python -m pipeline` must be this tree's).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's pipeline, also when run as a file

from pipeline.commands.bench import bench, runner  # noqa: E402
from pipeline.commands.bench.procstat import CLK_TCK, Sampler, stack_processes  # noqa: E402
from pipeline.commands.bench.receiver import Receiver, analyse  # noqa: E402
from pipeline.config import load as config  # noqa: E402
from pipeline.keyed import store  # noqa: E402

PORT = 18842
CONTROL = "127.0.0.1:18898"
MODEL = ROOT / "benchmarks" / "keyed_model"
MODES = {"unkeyed": (False, False), "keyed": (True, False), "state": (True, True)}  # mode -> (key, count)
BURN = {"trivial": 0.0, "burn": 1.0}  # model -> CPU ms per call
BROKER_PID = [0]  # the Mosquitto this script started (its CPU is ours, not another program's)
SATURATED = 0.95  # a run delivering under this share of the offered rate was limited by the stack


def cpu_ns(pid: int) -> int:
    """CPU time of every live thread of `pid`, nanoseconds (0 when it is gone)."""
    total = 0
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return 0
    for task in tasks:
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total


def busy_ticks() -> int:
    """CPU ticks the whole box spent busy so far (/proc/stat: all but idle and iowait)."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields) - fields[3] - fields[4]


def cpu_by_stage(run_dir: Path) -> dict[str, int]:
    """Stage label (`ingress`, `egress`, `worker:r`...) -> CPU ns of its processes, now."""
    out: dict[str, int] = defaultdict(int)
    for pid, name in stack_processes(run_dir).items():
        out[name.split(":")[0]] += cpu_ns(pid)
    return dict(out)


def stack_yaml(tmp: Path, workers: int, mode: str, burn_ms: float, synchronous: str = "full") -> Path:
    keyed, count = MODES[mode]
    key = '    key: "{1}"\n' if keyed else ""
    text = f"""\
name: keyed-bench
brokers:
  local: {{url: "mqtt://127.0.0.1:{PORT}", protocol: "5"}}
models:
  m:
    path: {MODEL}
    params: {{burn_ms: "{burn_ms:g}", count: "{'true' if count else 'false'}"}}
rules:
  - name: r
    sub: {{broker: local, topic: "kb/+/in", qos: 1}}
    model: m
    pub: {{broker: local, topic: "kb/{{1}}/out", qos: 1}}
    workers: {workers}
{key}control: {{listen: "{CONTROL}"}}
outbox: {{synchronous: {synchronous}}}
data_dir: {tmp / 'data'}
"""
    path = tmp / "stack.yaml"
    path.write_text(text)
    return path


class Checks:
    """Order and state seen in one stack's results, across its runs (state counts carry over between runs)."""

    def __init__(self) -> None:
        self.last_seq: dict[str, int] = {}
        self.last_n: dict[str, int] = {}

    def feed(self, records: list[tuple[float, bytes]], since: float, sent: int) -> dict[str, int]:
        out_of_order = bad_n = seen_n = 0
        done = bytearray(sent)
        for _, payload in records:
            try:
                msg = orjson.loads(payload)
                seq, ts, device = int(msg["seq"]), float(msg["ts"]), str(msg["deviceName"])
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
            if ts < since or not 0 <= seq < sent or done[seq]:
                continue  # stale or a duplicate: analyse() counts them
            done[seq] = 1
            if seq < self.last_seq.get(device, -1):
                out_of_order += 1
            self.last_seq[device] = max(seq, self.last_seq.get(device, -1))
            if "n" in msg:
                seen_n += 1
                if msg["n"] != self.last_n.get(device, 0) + 1:
                    bad_n += 1
                self.last_n[device] = msg["n"]
        return {"out_of_order": out_of_order, "state_results": seen_n, "state_not_next": bad_n}

    def end_of_run(self) -> None:
        self.last_seq.clear()  # seqs start again at 0 in the next run


class Commits:
    """How many results egress has committed so far, read every `every` seconds from the outbox file (read-only):
    the outbox's AUTOINCREMENT counter, one per stored result, exact and timed here rather than in a snapshot
    published twice a second. The stack's own rate, which the receiver's does not show under overload: there
    Mosquitto, one thread on the shared cores, forwards the results late and then in a burst."""

    def __init__(self, path: Path, every: float = 0.1) -> None:
        self.path, self.every = path, every
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="commits")

    def start(self) -> Commits:
        self._thread.start()
        return self

    def stop(self) -> list[tuple[float, int]]:
        self._stop.set()
        self._thread.join()
        return self.samples

    def _loop(self) -> None:
        db = None
        while not self._stop.is_set():
            try:
                db = db or sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
                row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
                self.samples.append((time.time(), row[0] if row else 0))
            except sqlite3.Error:
                pass  # not created yet, or busy: the next sample
            self._stop.wait(self.every)
        if db is not None:
            db.close()


def committed_rate(samples: list[tuple[float, int]], summary: dict[str, Any]) -> float:
    """Results committed per second while the load generator was still sending, from 1 s after the first commit
    of the run to the last send: the stack's capacity when the run is saturated. Not after the last send: the
    stack then drains its backlog on cores loadgen no longer takes (faster when it is CPU-bound), and a keyed
    rule's last keys finish on the workers they stick to."""
    if not samples:
        return 0.0
    base = samples[0][1]
    first = next((t for t, n in samples if n > base), None)
    if first is None:
        return 0.0
    start, end = first + 1.0, summary["started"] + summary["duration"]
    inside = [(t, n) for t, n in samples if start <= t <= end]
    if len(inside) < 2 or inside[-1][0] - inside[0][0] < 1.0:
        return 0.0
    return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])


def deciles(records: list[tuple[float, bytes]], since: float) -> list[float]:
    """Seconds from the first result to the receipt of the 0th, 10th, ... 100th percentile result (its shape)."""
    times = sorted(t for t, _ in records if t >= since)
    if not times:
        return []
    return [round(times[min(len(times) - 1, len(times) * k // 10)] - times[0], 3) for k in range(11)]


def one_run(t: runner.Target, rate: float, duration: float, devices: int, run_dir: Path, outbox: Path,
            checks: Checks) -> dict[str, Any]:
    """One loadgen run against the running stack, as `pipeline bench` runs it, plus CPU per stage in ns and the
    order and state checks (which need the results themselves)."""
    ns = argparse.Namespace(duration=duration, devices=devices, shape="flat", payload_bytes=150)
    load = os.getloadavg()[0]
    recv = Receiver(t.out_url, [t.out_filter], t.qos, (t.error_filter,))
    try:
        since = time.time()
        cpu0 = cpu_by_stage(run_dir)
        box0, wall0 = busy_ticks(), time.monotonic()
        sampler = Sampler(run_dir, {os.getpid(): "bench", BROKER_PID[0]: "broker"}).start()
        commits = Commits(outbox).start()
        try:
            summary = bench.drive(t, rate, ns, sampler)
        finally:
            samples = commits.stop()
        recv.wait_for(summary["sent"], idle=bench.IDLE, limit=60 + duration)
        cpu1 = cpu_by_stage(run_dir)
        stages = {name: asdict(u) for name, u in sampler.stop().items()}
        box = (busy_ticks() - box0) / CLK_TCK / (time.monotonic() - wall0) * 100
        records, errors = list(recv.records), recv.errors
    finally:
        recv.close()
    rep = analyse(records, summary["sent"], since)
    rep.errors = errors
    rep.lost = max(0, rep.lost - errors)
    checked = checks.feed(records, since, summary["sent"])
    checked["committed_per_s"] = committed_rate(samples, summary)
    checked["receipt_deciles_s"] = deciles(records, since)
    checked["load_ends_s"] = round(summary["started"] + summary["duration"] - min(
        (t for t, _ in records if t >= since), default=since), 3)
    checks.end_of_run()
    per_msg = {name: (cpu1.get(name, 0) - cpu0.get(name, 0)) / 1000 / max(rep.delivered, 1) for name in cpu1}
    return {"rate": rate, "offered": summary["achieved_rate"], **rep.as_dict(), **checked,
            "saturated": checked["committed_per_s"] < SATURATED * summary["achieved_rate"],
            "cpu_us_per_msg": per_msg, "load_1min_before": load, "box_cpu_pct": box,
            "others_cpu_pct": box - sum(u["cpu_pct"] for u in stages.values()), "stages": stages, "loadgen": summary}


def warnings(log: Path) -> list[str]:
    """The stack's log lines at WARNING and above (a redispatch after a worker timeout reorders and delays)."""
    text = log.read_text(errors="replace") if log.exists() else ""
    return [line for line in text.splitlines() if any(w in line for w in (" WARNING ", " ERROR ", " CRITICAL "))]


def one_stack(model: str, workers: int, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """A fresh stack of (model, workers, mode): warm-up, paced run, saturating run."""
    tmp = Path(tempfile.mkdtemp(prefix="keyed-bench-"))
    path = stack_yaml(tmp, workers, mode, BURN[model], args.synchronous)
    cfg = config.load(path)
    t = runner.target(cfg, 1)
    paced = args.paced_burn if model == "burn" else args.paced_trivial
    saturate = args.saturate_burn if model == "burn" else args.saturate_trivial
    stack = runner.OwnStack(cfg, [])
    checks, result, code = Checks(), {"model": model, "workers": workers, "mode": mode}, 1
    try:
        stack.wait_ready()
        outbox = store.path_in(tmp / "data")
        one_run(t, paced, 1.0, args.devices, stack.run_dir, outbox, checks)  # warm-up
        result["paced"] = one_run(t, paced, args.duration, args.devices, stack.run_dir, outbox, checks)
        result["saturating"] = one_run(t, saturate, args.duration, args.devices, stack.run_dir, outbox, checks)
        code = 0
    finally:
        result["log_warnings"] = warnings(stack.log)
        stopped = stack.stop(keep=code != 0)
        if code == 0 and stopped == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"  kept {stack.run_dir} and {tmp} (pipeline up exited with {stopped})", file=sys.stderr)
    return result


def start_mosquitto(tmp: Path) -> subprocess.Popen:
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", PORT)) == 0:
            raise SystemExit(f"something already listens on {PORT}: stop it first")
    conf = tmp / "mosquitto.conf"
    conf.write_text(f"listener {PORT} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 0\n")
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    with (tmp / "mosquitto.log").open("wb") as log:
        broker = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=log)
    end = time.monotonic() + 10
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", PORT)) == 0:
                return broker
        time.sleep(0.1)
    broker.kill()
    raise SystemExit(f"mosquitto did not listen on {PORT}")


# --- the SQLite part alone ----------------------------------------------------------------------------------

MICRO_KINDS = ("unkeyed", "keyed", "state")  # the entries of a frame: plain rows; keyed, state unchanged; new state


def micro(folder: Path, seconds: float) -> dict[str, Any]:
    """µs per result (wall, and CPU of this process: the fsyncs of `full` wait without CPU) of egress's outbox work
    alone, through `Outbox.commit` as egress calls it: one transaction per
    frame of 1, 8 and 32 results of QoS 1 inputs (a key each, 1,000 keys, packet ids cycling), then the rows
    deleted as their PUBACKs do; `synchronous=full`. unkeyed: the rows only; keyed: each entry also looks up its
    state and `done` rows and writes its `done` row (state unchanged); state: each also writes its key's state."""
    from pipeline.stages.egress.outbox import Entry, Keyed, Outbox

    payload = b'{"seq": 1, "ts": 1700000000.0, "deviceName": "d1", "n": 7}'
    out: dict[str, Any] = {}
    for frame in (1, 8, 32):
        per: dict[str, float] = {}
        for kind in MICRO_KINDS:
            box = Outbox(folder / f"micro-{frame}-{kind}.sqlite3", 1 << 40, "full")
            done, mid, version = 0, 0, [0] * 1000  # the version each key's state is at (the base of its next write)
            t0, c0 = time.perf_counter(), time.process_time()
            while time.perf_counter() - t0 < seconds:
                entries = []
                for _ in range(frame):
                    mid = mid % 65535 + 1
                    key = mid % 1000
                    row = ("local", f"kb/d{key}/out", payload, 1, 0, "r", 1.0)
                    keyed = None if kind == "unkeyed" else Keyed(
                        "r", f"d{key}", "local", mid, 1, f"b-{done}", b"x" * 32, False,
                        store.encode({"n": done}) if kind == "state" else None, version[key])
                    version[key] += kind == "state"
                    entries.append(Entry(row, keyed))
                    done += 1
                committed = box.commit(entries)
                if kind != "unkeyed" and committed.stale + committed.recognised:
                    raise RuntimeError(f"micro: the outbox refused {committed}")  # the measure would be wrong
                stored = box.after("local", 0, frame)
                box.delete([(r.id, len(r.payload)) for r in stored])
            per[kind] = (time.perf_counter() - t0) / done * 1e6
            per[kind + "_cpu"] = (time.process_time() - c0) / done * 1e6
            box.close()
        for suffix in ("", "_cpu"):
            per["keyed_extra" + suffix] = per["keyed" + suffix] - per["unkeyed" + suffix]
            per["state_extra" + suffix] = per["state" + suffix] - per["keyed" + suffix]
        out[str(frame)] = per
    return out


# --- report ---------------------------------------------------------------------------------------------------

def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    base = {(r["model"], r["workers"]): r for r in results if r["mode"] == "unkeyed"}
    rows = []
    for r in results:
        sat, paced = r["saturating"], r["paced"]
        b = base.get((r["model"], r["workers"]))
        ratio = sat["committed_per_s"] / b["saturating"]["committed_per_s"] if b else None
        egress_base = b["paced"]["cpu_us_per_msg"].get("egress") if b else None
        rows.append({
            "model": r["model"], "workers": r["workers"], "mode": r["mode"],
            "offered": round(sat["offered"]), "throughput": round(sat["throughput"]), "saturated": sat["saturated"],
            "committed_per_s": round(sat["committed_per_s"]),
            "lost": sat["lost"] + paced["lost"], "ratio": ratio,
            "paced_rate": r["paced"]["rate"], "p50": paced["latency_ms"]["p50"], "p99": paced["latency_ms"]["p99"],
            "egress_us": paced["cpu_us_per_msg"].get("egress"),
            "egress_us_vs_unkeyed": (paced["cpu_us_per_msg"].get("egress", 0) - egress_base) if egress_base else None,
            "egress_us_saturated": sat["cpu_us_per_msg"].get("egress"),
            "ingress_us_saturated": sat["cpu_us_per_msg"].get("ingress"),
            "stack_us": sum(v for k, v in paced["cpu_us_per_msg"].items() if k in ("ingress", "worker", "egress")),
            "out_of_order": sat["out_of_order"] + paced["out_of_order"],
            "state_not_next": sat["state_not_next"] + paced["state_not_next"],
            "load": max(sat["load_1min_before"], paced["load_1min_before"]),
            "others": max(sat["others_cpu_pct"], paced["others_cpu_pct"]),
        })
    return rows


COLUMNS = (("model", "model", "<8"), ("w", "workers", ">2"), ("mode", "mode", "<8"), ("offered", "offered", ">8,"),
           ("thru/s", "throughput", ">7,"), ("cmt/s", "committed_per_s", ">7,"), ("ratio", "ratio", ">6.2f"),
           ("lost", "lost", ">5"),
           ("paced", "paced_rate", ">6,.0f"), ("p50ms", "p50", ">8.2f"), ("p99ms", "p99", ">8.2f"),
           ("egr us", "egress_us", ">7.0f"), ("Δegr", "egress_us_vs_unkeyed", ">+6.0f"),
           ("stk us", "stack_us", ">7.0f"), ("egr sat", "egress_us_saturated", ">7.0f"),
           ("ing sat", "ingress_us_saturated", ">7.0f"), ("ooo", "out_of_order", ">6"), ("n!", "state_not_next", ">3"),
           ("other%", "others", ">7.0f"))


def print_table(rows: list[dict[str, Any]]) -> None:
    """One line per stack; `other%`: CPU of programs not in this benchmark during its runs (100 = one core)."""
    align = [(fmt[0], int("".join(c for c in fmt[1:].split(".")[0] if c.isdigit()))) for _, _, fmt in COLUMNS]
    print(" ".join(f"{name:{a}{w}}" for (name, _, _), (a, w) in zip(COLUMNS, align, strict=True)))
    for r in rows:
        cells = [f"{r[key]:{fmt}}" if r[key] is not None else f"{'-':{a}{w}}"
                 for (_, key, fmt), (a, w) in zip(COLUMNS, align, strict=True)]
        print(" ".join(cells) + ("" if r["saturated"] else "  (not saturated)"))


def host() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True).stdout.strip())
    return {"node": platform.node(), "nproc": os.cpu_count(), "cpu": cpu, "python": sys.version.split()[0],
            "platform": platform.platform(), "commit": commit + ("-dirty" if dirty else "")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    p.add_argument("--models", nargs="+", choices=tuple(BURN), default=list(BURN))
    p.add_argument("--modes", nargs="+", choices=tuple(MODES), default=list(MODES))
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--duration", type=float, default=6.0, help="seconds of load per run (default 6)")
    p.add_argument("--paced-trivial", type=float, default=1000.0, help="msg/s of the paced run, trivial model")
    p.add_argument("--paced-burn", type=float, default=600.0, help="msg/s of the paced run, 1 ms model")
    p.add_argument("--saturate-trivial", type=float, default=12000.0, help="offered msg/s, trivial model")
    p.add_argument("--saturate-burn", type=float, default=2500.0, help="offered msg/s, 1 ms model")
    p.add_argument("--synchronous", choices=("full", "normal"), default="full",
                   help="the outbox's synchronous (default full, the stack's default)")
    p.add_argument("--micro-seconds", type=float, default=2.0)
    p.add_argument("--no-micro", action="store_true")
    p.add_argument("--json", help="write everything here (default benchmarks/keyed-MMDD.json)")
    args = p.parse_args()
    out = Path(args.json or ROOT / "benchmarks" / f"keyed-{time.strftime('%m%d')}.json")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so `finally` stops what was started
    started, load = time.time(), os.getloadavg()
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    tmp = Path(tempfile.mkdtemp(prefix="keyed-bench-broker-"))
    broker = start_mosquitto(tmp)
    BROKER_PID[0] = broker.pid
    results: list[dict[str, Any]] = []
    try:
        for model in args.models:
            for workers in args.workers:
                for mode in args.modes:
                    print(f"-- {model} model, {workers} workers, {mode}", flush=True)
                    results.append(one_stack(model, workers, mode, args))
    finally:
        broker.terminate()
        broker.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    rows = summarise(results)
    print_table(rows)
    doc: dict[str, Any] = {"host": host(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
                           "seconds": round(time.time() - started), "load_before": load,
                           "settings": {k: v for k, v in vars(args).items() if k != "json"},
                           "summary": rows, "stacks": results}
    out.write_text(json.dumps(doc, indent=1) + "\n")  # now, and again with the micro-measure
    if not args.no_micro:
        with tempfile.TemporaryDirectory() as d:
            doc["micro_us_per_row"] = micro(Path(d), args.micro_seconds)
        print("Outbox.commit alone, µs per result, wall / CPU (stored, then deleted; a transaction per frame, "
              "synchronous=full):")
        for frame, per in doc["micro_us_per_row"].items():
            print(f"  {frame:>2} per frame: " + ", ".join(
                f"{kind} {per[kind]:.1f} / {per[kind + '_cpu']:.1f}" for kind in MICRO_KINDS))
    doc["load_after"] = os.getloadavg()
    print(f"load average after: {doc['load_after'][0]:.2f}; {doc['seconds']} s; wrote {out}")
    out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
