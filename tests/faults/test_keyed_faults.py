"""Keyed rules on the real stack (issue 18): per-device order across 4 workers, also through a kill -9 of a worker
and a hot reload; per-device state that counts every message exactly once through the combined faults.

Messages go out in runs of 1-8 of one device (the device drawn at random), so a device's next message usually
arrives while its previous one is still in a worker: without per-key order, the 0-2 ms the order model sleeps
at random lets them overtake each other.
"""

from __future__ import annotations

import random
import shutil
import time
from collections import Counter, defaultdict
from itertools import pairwise
from pathlib import Path

import orjson
from conftest import HERE
from test_faults import CHAOS, Collector, _stages, kill, publish, report, settled, through_chaos
from test_reload import TOKEN, post

DEVICES = 200
ORDER_N, ORDER_RATE = 20_000, 1500.0  # the order tests publish for 13.3 s
COMBINED = "worker, egress, ingress 4 s apart, then the broker down 3 s"
assert COMBINED in CHAOS

CONFIG = """
brokers:
  local: {url: BROKER}
models:
  MODEL_NAME: {path: MODEL_PATH}
rules:
  - name: keyed
    sub: {broker: local, topic: "PREFIX/+/in", qos: 1}
    model: MODEL_NAME
    key: "{1}"
    state: {max_bytes: 64KiB, expire_after: 7d}
    pub: {broker: local, topic: "PREFIX/{1}/out", qos: 1}
    workers: WORKERS
    timeout: 2s
    max_attempts: 3
control: {listen: CONTROL, token: TOKEN}
"""


def config(broker, model: Path, prefix: str, workers: int) -> str:
    return (CONFIG.replace("BROKER", broker.url).replace("MODEL_NAME", model.name).replace("MODEL_PATH", str(model))
            .replace("PREFIX", prefix).replace("WORKERS", str(workers)).replace("TOKEN", TOKEN))


def model_copy(name: str, tmp_path: Path) -> Path:
    """A copy of tests/models/<name> the test may change (a changed folder is a new version for a reload)."""
    return Path(shutil.copytree(HERE / "models" / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__")))


def schedule(n: int, seed: int) -> list[tuple[int, int]]:
    """(device, seq) of each of `n` messages: runs of 1-8 messages of one random device; seq counts a device's
    messages from 0."""
    rng, out, sent = random.Random(seed), [], Counter()
    while len(out) < n:
        device = rng.randrange(DEVICES)
        for _ in range(min(rng.randint(1, 8), n - len(out))):
            out.append((device, sent[device]))
            sent[device] += 1
    assert len(sent) == DEVICES, "a device without messages: change the seed"
    return out


def load(port: int, plan: list[tuple[int, int]], prefix: str, rate: float):
    """Publish `plan` at `rate` (QoS 1), message i on <prefix>/d<device>/in with payload {device, seq, gseq: i}."""
    return publish(port, n=len(plan), rate=rate, topic_for=lambda i: f"{prefix}/d{plan[i][0]}/in",
                   payload_for=lambda i: {"device": plan[i][0], "seq": plan[i][1], "gseq": i})  # seq: the device's


class Keyed(Collector):
    """A Collector of keyed messages (payloads {device, seq, ...}, seq counted per device): `seen` and `errors` are
    by (device, seq); `bodies[device]` holds the device's payloads in arrival order; `fresh[(device, seq)]` counts
    deliveries without the DUP flag (the broker's first delivery of each message it stored)."""

    def __init__(self, port: int, topics: tuple[str, ...], name: str = "collector") -> None:
        self.bodies: dict[int, list[dict]] = defaultdict(list)
        self.fresh: Counter[tuple[int, int]] = Counter()
        super().__init__(port, topics, name)

    def _got(self, _c, _u, m) -> None:
        body = orjson.loads(m.payload)
        with self.lock:
            self.arrivals.append(time.monotonic())
            if m.topic.startswith("pipeline/errors/"):
                event = orjson.loads(body["payload"])
                self.errors[event["device"], event["seq"]] = body
                return
            at = (body["device"], body["seq"])
            self.seen[at] = self.seen.get(at, 0) + 1
            self.fresh[at] += not m.dup
            self.bodies[body["device"]].append(body)


def wait_out(col: Keyed, n: int, loader, limit: float) -> None:
    """Until all `n` came out (or `limit` seconds after the loader is done)."""
    loader.join()
    loader.client.loop_stop()
    deadline = time.monotonic() + limit
    while len(col.seen) + len(col.errors) < n and time.monotonic() < deadline:
        time.sleep(0.5)


def disorder(col: Keyed, plan: list[tuple[int, int]]) -> list[str]:
    """Per device: seqs missing, seqs out of order or repeated (with their positions in arrival order), key values
    other than d<device>."""
    sent = Counter(device for device, _ in plan)
    problems = []
    for device in range(DEVICES):
        bodies = col.bodies.get(device, [])
        seqs = [b["seq"] for b in bodies]
        missing = sorted(set(range(sent[device])) - set(seqs))
        first: dict[int, int] = {}
        repeated, backwards = [], []
        for i, seq in enumerate(seqs):
            if seq in first:
                repeated.append(f"seq {seq} at positions {first[seq]} and {i}")
            first.setdefault(seq, i)
        for i, (a, b) in enumerate(pairwise(seqs)):
            if b < a and b not in seqs[:i]:  # an overtaken seq, not a repeat
                backwards.append(f"seq {b} at position {i + 1} after seq {a}")
        keys = {b["key"] for b in bodies} - {f"d{device}"}
        wrong = [f"{what}: {found[:5]}{f' and {len(found) - 5} more' if len(found) > 5 else ''}"
                 for what, found in (("missing", missing), ("repeated", repeated), ("out of order", backwards),
                                     ("other key values", sorted(keys, key=str))) if found]
        if wrong:
            problems.append(f"device {device} ({sent[device]} sent): " + "; ".join(wrong))
    return problems


def run_order(name: str, broker, stack_factory, tmp_path: Path, faults) -> None:
    """20,000 messages at 1,500/s over 200 devices through 4 workers; `faults(up, model)` runs while they flow.
    Per device: every seq came out, in strictly increasing order."""
    n, rate = ORDER_N, ORDER_RATE
    plan = schedule(n, seed=18)
    model = model_copy("keyed_seq", tmp_path)
    up = stack_factory(config(broker, model, "k", workers=4))
    col = Keyed(broker.port, ("k/+/out", "pipeline/errors/#"))
    t0 = time.monotonic()
    loader = load(broker.port, plan, "k", rate)
    faults(up, model)
    wait_out(col, n, loader, limit=60)
    col.close()
    report(name, col, t0, t0, n)
    print(f"KEYED {name}: {time.monotonic() - t0:.1f} s from the first message to the end")
    problems = disorder(col, plan)
    assert not problems, (f"{name}: {len(problems)} device(s) wrong:\n" + "\n".join(problems[:20])
                          + f"\nGET /stages: {_stages(up)}\n{up.output()[-4000:]}")
    assert not col.errors, f"error records: {list(col.errors.items())[:3]}"


def test_order_per_device_across_4_workers(pbroker, stack_factory, tmp_path):
    run_order("keyed order, 4 workers", pbroker, stack_factory, tmp_path, lambda up, model: None)


def test_order_per_device_through_a_kill_and_a_reload(pbroker, stack_factory, tmp_path):
    reloads, at = [], {}

    def faults(up, model: Path) -> None:
        t0 = time.monotonic()
        time.sleep(3.0)
        at["kill"] = time.monotonic() - t0
        kill(up, "pipeline worker")
        time.sleep(3.0)
        with (model / "index.py").open("a") as f:
            f.write("# version 2\n")
        at["reload"] = time.monotonic() - t0
        reloads.append(post(up, f"/models/{model.name}/reload"))
        at["reloaded"] = time.monotonic() - t0
        print(f"KEYED kill -9 at {at['kill']:.1f} s, reload from {at['reload']:.1f} s to {at['reloaded']:.1f} s "
              f"after the loader started: HTTP {reloads[0][0]}, {reloads[0][1].get('workers_replaced')} replaced")

    run_order("keyed order, kill -9 worker + hot reload", pbroker, stack_factory, tmp_path, faults)
    status, result = reloads[0]
    assert status == 200 and result["ok"] and result["changed"] and result["workers_replaced"] == 4, result
    assert at["reload"] < ORDER_N / ORDER_RATE, f"the faults came after the last message was published: {at}"


def test_state_counts_each_message_once_through_combined_faults(pbroker, stack_factory, tmp_path):
    """25,000 messages at 1,000/s over 200 devices, 2 workers, while CHAOS[COMBINED] happens. A witness on the
    inputs tells how many messages of each device the broker delivered: N, counting a message the loader sent
    twice (a broker restart cut its PUBACK) as the two messages the broker stored. For every device the counts
    published must be exactly 1..N, each count for one seq only (no update lost), each seq with one count per
    message the broker stored for it (none applied twice)."""
    n = 25_000
    plan = schedule(n, seed=25)
    up = stack_factory(config(pbroker, model_copy("counting", tmp_path), "f", workers=2))
    witness = Keyed(pbroker.port, ("f/+/in",), name="witness")
    col = Keyed(pbroker.port, ("f/+/out", "pipeline/errors/#"))
    t0 = time.monotonic()
    lost = through_chaos(COMBINED, pbroker, up, load(pbroker.port, plan, "f", 1000.0), witness, col, n)
    report(f"keyed state, {COMBINED}", col, t0, t0, n)
    stored = {at: max(1, witness.fresh[at]) for at in witness.seen}  # messages the broker stored per (device, seq)
    print(f"KEYED state: {time.monotonic() - t0:.1f} s; witness saw {len(witness.seen)} distinct, "
          f"{sum(stored.values()) - len(stored)} stored twice; lost {len(lost)}; DUPs at ingress "
          f"{counter(up, 'ingress', 'redelivered')}; results egress found already done "
          f"{counter(up, 'egress', 'already_done')}; state writes {counter(up, 'egress', 'state_writes')}")
    assert not lost, (f"{len(lost)} the broker delivered never came out, e.g. {sorted(lost)[:10]}\n"
                      f"GET /stages: {_stages(up)}\n{up.output()[-4000:]}")
    assert not col.errors, f"error records: {list(col.errors.items())[:3]}"
    problems = miscounted(col, stored)
    assert not problems, (f"{len(problems)} device(s) miscounted:\n" + "\n".join(problems[:20])
                          + f"\nGET /stages: {_stages(up)}\n{up.output()[-4000:]}")
    assert settled(up), f"a depth is not 0 once everything came out: {_stages(up)}"


def counter(up, stage: str, name: str):
    """A counter of a stage in GET /stages (summed over its processes, killed ones included, less the last half
    second of one killed with SIGKILL); None if unavailable."""
    try:
        return next(s for s in up.get("/stages")[1]["stages"] if s["name"] == stage)["counters"].get(name, 0)
    except (OSError, KeyError, StopIteration):
        return None


def miscounted(col: Keyed, stored: dict[tuple[int, int], int]) -> list[str]:
    """Per device, what is wrong with its counts given `stored` (messages the broker stored per (device, seq))."""
    per_device = Counter()
    for (device, _), k in stored.items():
        per_device[device] += k
    problems = []
    for device in range(DEVICES):
        n = per_device[device]
        by_count: dict[int, set[int]] = defaultdict(set)
        by_seq: dict[int, set[int]] = defaultdict(set)
        for b in col.bodies.get(device, []):
            by_count[b["count"]].add(b["seq"])
            by_seq[b["seq"]].add(b["count"])
        wrong = []
        if set(by_count) != set(range(1, n + 1)):
            wrong.append(f"counts missing {sorted(set(range(1, n + 1)) - set(by_count))[:10]}, "
                         f"beyond 1..{n}: {sorted(set(by_count) - set(range(1, n + 1)))[:10]}")
        if max(by_count, default=0) != n:
            top = max(by_count, default=0)
            wrong.append(f"highest count {top}, not {n}: {'an update lost' if top < n else 'one applied twice'}")
        shared = {c: sorted(s) for c, s in by_count.items() if len(s) > 1}
        if shared:
            wrong.append(f"one count for several seqs (an update lost): {dict(list(shared.items())[:5])}")
        twice = {s: sorted(c) for s, c in by_seq.items() if len(c) != stored.get((device, s), 0)}
        if twice:
            wrong.append("seqs with another number of counts than the broker stored them (applied twice, or not "
                         f"witnessed): {dict(list(twice.items())[:5])}")
        if wrong:
            problems.append(f"device {device} ({n} messages): " + "; ".join(wrong))
    return problems
