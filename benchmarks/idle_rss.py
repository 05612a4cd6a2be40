"""Idle memory of a stack: RSS, PSS, USS of every process `pipeline up` starts, summed; and how soon it is ready.

    python benchmarks/idle_rss.py [--rules 1 10 30 50] [--shared] [--settle 8] [--json out.json]

For each count N of --rules (default 1): starts its own Mosquitto on 127.0.0.1:18841 (the broker is not
counted) and an N-rule stack from a temporary config (one worker per rule, or with --shared every rule
`workers: shared` on the model's pool of one process; the example threshold model, one topic per rule), times
`pipeline up` until GET /readyz answers 200 ("ready after"), waits --settle seconds more, reads
/proc/PID/smaps_rollup of each process in the stack's process tree (`pipeline up` itself excluded: it is the
launcher, not the stack), prints a table and stops everything. With several counts it ends with one summary
line per count. Run it from the checkout to measure (`python -m pipeline` is started
from the current directory).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PORT = 18841


def rollup(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        out[key] = int(value.split()[0])  # kB
    return out


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").decode().split("\0")


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out += [int(c) for c in text]
    return out


def tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children(p)
    return out


def label(pid: int) -> str:
    args = cmdline(pid)
    if "supervisor.supervisord" in args:
        return "supervisord"
    if "pipeline" in args:
        i = args.index("pipeline")
        stage = args[i + 1] if i + 1 < len(args) else "?"
        if stage == "control":
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            stage += " worker" if "pipeline" in cmdline(parent) else ""
        if stage == "worker":
            stage = f"worker {args[args.index('--rule') + 1]}"
        return stage
    name = Path(f"/proc/{pid}/comm").read_text().strip()
    return f"{name} ({' '.join(args)[:40]})"


def wait_port(port: int, timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"nothing listens on {port}")


RULE = """\
  - name: alarm{n}
    sub: {{broker: local, topic: "plant{n}/+/telemetry", qos: 1}}
    model: threshold
    pub: {{broker: local, topic: "plant{n}/{{1}}/alarm", qos: 1}}
    workers: {workers}
"""


def config(tmp: Path, rules: int, control_port: int, shared: bool = False) -> Path:
    """An N-rule config in `tmp`: one worker per rule (`shared`: one pool process for all), each rule on its own
    topic."""
    workers = "shared" if shared else 1
    conf = tmp / "idle.yaml"
    conf.write_text(f"""\
name: idle-rss
brokers:
  local: {{url: "mqtt://127.0.0.1:{PORT}"}}
models:
  threshold: {{path: {ROOT / 'models' / 'threshold'}, params: {{limit: 30}}}}
rules:
{''.join(RULE.format(n=i, workers=workers) for i in range(rules))}control: {{listen: "127.0.0.1:{control_port}"}}
run_dir: {tmp / 'run'}
data_dir: {tmp / 'data'}
""")
    return conf


def ready(control_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{control_port}/readyz", timeout=1) as r:
            return r.status == 200
    except (OSError, urllib.error.HTTPError):
        return False


def wait_ready(up: subprocess.Popen, log: Path, control_port: int, timeout: float = 120) -> float:
    """Seconds from now until the stack answers /readyz with 200 (SystemExit with its log when it never does)."""
    t0 = time.monotonic()
    while not ready(control_port):
        if up.poll() is not None or time.monotonic() - t0 > timeout:
            sys.stderr.write(log.read_text())
            raise SystemExit("the stack did not become ready")
        time.sleep(0.05)
    return time.monotonic() - t0


def measure(up: subprocess.Popen) -> list[dict]:
    rows = []
    for pid in tree(up.pid)[1:]:  # not `pipeline up` itself
        r = rollup(pid)
        assert "pipeline" not in cmdline(pid) or Path(f"/proc/{pid}/cwd").resolve() == Path.cwd().resolve()
        maps = Path(f"/proc/{pid}/maps").read_text()
        rows.append({"pid": pid, "name": label(pid), "rss": r["Rss"], "pss": r["Pss"],
                     "pydantic": "pydantic_core" in maps,
                     "uss": r["Private_Clean"] + r["Private_Dirty"],
                     "threads": len(list(Path(f"/proc/{pid}/task").iterdir()))})
    rows.sort(key=lambda r: r["name"])
    return rows


def show(rows: list[dict]) -> dict[str, float]:
    print(f"{'process':<22}{'pid':>8}{'thr':>5}{'RSS MiB':>10}{'PSS MiB':>10}{'USS MiB':>10}  pydantic")
    for r in rows:
        print(f"{r['name']:<22}{r['pid']:>8}{r['threads']:>5}{r['rss'] / 1024:>10.1f}{r['pss'] / 1024:>10.1f}"
              f"{r['uss'] / 1024:>10.1f}  {'yes' if r['pydantic'] else 'no'}")
    tot = {k: sum(r[k] for r in rows) / 1024 for k in ("rss", "pss", "uss")}
    print(f"{'TOTAL':<35}{tot['rss']:>10.1f}{tot['pss']:>10.1f}{tot['uss']:>10.1f}")
    return tot


def run_stack(rules: int, args: argparse.Namespace) -> dict:
    """Start an N-rule stack with its own broker, measure it idle, stop both; the figures."""
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", PORT)) == 0:
            raise SystemExit(f"something already listens on {PORT}: stop it first")
    tmp = Path(tempfile.mkdtemp(prefix="idle-rss-"))
    (tmp / "mosquitto.conf").write_text(f"listener {PORT} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    conf = config(tmp, rules, args.control_port, args.shared)
    broker = subprocess.Popen(["mosquitto", "-c", str(tmp / "mosquitto.conf")], stderr=subprocess.DEVNULL)
    up = None
    try:
        wait_port(PORT)
        # PYTHONPATH: every stage imports this checkout, not an installed one
        env = {**os.environ, "PYTHONPATH": os.getcwd(), **dict(e.split("=", 1) for e in args.env)}
        up = subprocess.Popen([sys.executable, "-m", "pipeline", "up", "-c", str(conf)], cwd=os.getcwd(), env=env,
                              stdout=open(tmp / "up.log", "wb"), stderr=subprocess.STDOUT)
        ready_after = wait_ready(up, tmp / "up.log", args.control_port)
        time.sleep(args.settle)
        rows = measure(up)
        print(f"--- {rules} rule(s): ready after {ready_after:.2f} s")
        tot = show(rows)
        sys.stdout.flush()
        time.sleep(args.hold)
        return {"rules": rules, "shared": args.shared, "processes": rows, "total_mib": tot,
                "ready_after_s": round(ready_after, 2)}
    finally:
        if up is not None and up.poll() is None:
            up.send_signal(signal.SIGTERM)
            try:
                up.wait(60)
            except subprocess.TimeoutExpired:
                up.kill()
        broker.terminate()
        broker.wait()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rules", type=int, nargs="+", default=[1], help="rule counts to measure, one stack each")
    ap.add_argument("--shared", action="store_true", help="every rule `workers: shared`: one pool process")
    ap.add_argument("--settle", type=float, default=8.0, help="seconds to wait after the stack is ready")
    ap.add_argument("--json", help="also write the numbers here")
    ap.add_argument("--control-port", type=int, default=15888)
    ap.add_argument("--env", action="append", default=[], metavar="VAR=VALUE",
                    help="set in the environment of the stack (every process inherits it), e.g. MALLOC_ARENA_MAX=2")
    ap.add_argument("--hold", type=float, default=0, help="keep the stack up this many seconds after measuring")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so `finally` stops the stack
    runs = [run_stack(n, args) for n in args.rules]
    print(f"\n{'rules':>5}{'procs':>7}{'RSS MiB':>10}{'PSS MiB':>10}{'ready s':>9}")
    for r in runs:
        print(f"{r['rules']:>5}{len(r['processes']):>7}{r['total_mib']['rss']:>10.1f}{r['total_mib']['pss']:>10.1f}"
              f"{r['ready_after_s']:>9.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
