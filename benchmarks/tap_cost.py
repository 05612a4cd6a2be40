"""What the ingress tap costs the ingress thread per message: `Ingress._arrive` (one QoS 0 message for one rule)
with no recording, the tap's test alone (what a message pays when no recording runs), and `_arrive` while the rule
is recorded (the append the ingress thread does; the tap thread writes meanwhile). CPU time per call, the least of
REPEATS rounds. Run from the repository: `.venv/bin/python benchmarks/tap_cost.py`.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from pipeline.config import load as config
from pipeline.rollout import taps
from pipeline.stages.ingress.stage import Ingress
from pipeline.wire.endpoints import Endpoints

N, REPEATS = 2000, 30
CONFIG = """
brokers: {local: {url: "mqtt://127.0.0.1:1"}}
models: {m: {path: MODEL}}
rules:
  - {name: r, sub: {broker: local, topic: "in/+/data", qos: 0}, model: m, pub: {broker: local, topic: out},
     backlog: 100000}
"""


def per_call(fn, n: int = N) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        t0 = time.process_time()
        fn(n)
        best = min(best, time.process_time() - t0)
    return best / n * 1e9


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        (root / "m").mkdir()
        (root / "m" / "index.py").write_text("def handler(e, c):\n    return e\n")
        (root / "p.yaml").write_text(CONFIG.replace("MODEL", str(root / "m")))
        cfg = config.load(root / "p.yaml")
        run = root / "run"
        run.mkdir(mode=0o700)
        ing = Ingress(cfg, Endpoints.for_config(cfg, run))
        payload = b'{"device": "d1", "value": 42}'

        def arrive(n: int) -> None:
            for _ in range(n):
                ing._arrive("local", "in/d1/data", payload, 0, 0, False, ())
            ing.queues[0].clear_backlog()

        def test_only(n: int) -> None:
            t = ing.taps
            for _ in range(n):
                if t.on:
                    pass

        off = per_call(arrive)
        test = per_call(test_only)
        taps.ask(run, taps.Request("r", count=10**6, bytes=1 << 30, seconds=600))
        while not ing.taps.on:
            time.sleep(0.05)
        on = per_call(arrive)
        taps.withdraw(run, "r")
        ing.close()
    print(f"_arrive, no recording:   {off:7.0f} ns per message")
    print(f"the tap's test alone:    {test:7.0f} ns per message ({100 * test / off:.1f} % of _arrive)")
    print(f"_arrive, rule recorded:  {on:7.0f} ns per message (+{on - off:.0f} ns)")


if __name__ == "__main__":
    main()
