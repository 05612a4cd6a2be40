"""/healthz latency while slow and idle clients keep connecting to the control API.

Starts `pipeline control` (the `pipeline` package importable from the current directory) on a free port of
127.0.0.1 with no stack behind it, then runs N clients of each kind, each reconnecting as soon as it is closed:
slow (a request head a byte every 0.3 s, never finished), idle (connects, sends nothing) and lingering (a whole
request with `Connection: close`, then neither reads to the end nor closes). Meanwhile it times --probes GETs
of /healthz (timeout 30 s each; a timeout counts as 30 s).

    python benchmarks/control_slow_clients.py [--clients 16] [--probes 10] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIG = """
brokers: {{local: {{url: "mqtt://127.0.0.1:1"}}}}
models: {{probe: {{path: {models}/probe}}}}
rules:
  - {{name: r, sub: {{broker: local, topic: "a/+"}}, model: probe, pub: {{broker: local, topic: "b/{{1}}"}}}}
control: {{listen: "127.0.0.1:{port}"}}
"""
LINGER = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slow(port: int, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                for ch in b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 1000:
                    s.send(bytes([ch]))
                    if stop.wait(0.3):
                        return
        except OSError:
            pass


def quiet(port: int, stop: threading.Event, ask: bytes) -> None:
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(ask)
                while s.recv(1) and not stop.wait(0.5):
                    pass
        except OSError:
            pass


def probe(port: int) -> float:
    t0 = time.monotonic()
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30).read()
    except OSError:
        return 30.0
    return time.monotonic() - t0


def measure(port: int, clients: int, probes: int) -> list[float]:
    stop = threading.Event()
    kinds = [(slow, (port, stop)), (quiet, (port, stop, b"")), (quiet, (port, stop, LINGER))]
    threads = [threading.Thread(target=f, args=a, daemon=True) for f, a in kinds for _ in range(clients)]
    for t in threads:
        t.start()
    time.sleep(3)
    took = []
    for _ in range(probes):
        took.append(probe(port))
        time.sleep(0.3)
    stop.set()
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=16, help="clients of each kind")
    ap.add_argument("--probes", type=int, default=10)
    ap.add_argument("--json")
    args = ap.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as d:
        cfg = Path(d) / "pipeline.yaml"
        cfg.write_text(CONFIG.format(models=HERE.parent / "tests" / "models", port=port))
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", "control", "-c", str(cfg), "--run-dir",
                                 str(Path(d) / "run")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(3)
            took = measure(port, args.clients, args.probes)
        finally:
            proc.terminate()
            proc.wait(15)
    doc = {"clients_per_kind": args.clients, "probes": len(took), "worst_s": round(max(took), 3),
           "median_s": round(sorted(took)[len(took) // 2], 3), "python": platform.python_version()}
    print(json.dumps(doc))
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
