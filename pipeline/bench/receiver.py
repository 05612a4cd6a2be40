"""The benchmark's receiver: subscribes to a stack's output topics and measures what came back.

The bench model (`pipeline/bench/models/echo`) echoes each input's `seq` and `ts` (send time, unix
seconds), so from the results alone the receiver counts delivered, lost and duplicate messages and the
latency from send to receipt (loadgen, stack and receiver run on one machine, so the clocks agree).
paho's callback only appends (receive time, payload); decoding happens after the run.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass, field

import orjson
import paho.mqtt.client as mqtt

from pipeline.bench import net


@dataclass
class Report:
    sent: int
    delivered: int = 0  # distinct seqs received
    lost: int = 0  # sent - delivered
    duplicates: int = 0  # copies of a seq received more than once
    errors: int = 0  # records on the rule's error topic
    stale: int = 0  # results of messages sent before this run started (an earlier run's stragglers)
    unparsed: int = 0  # results without a readable seq/ts
    throughput: float = 0.0  # delivered results per second, first receipt to last
    latency_ms: dict[str, float] = field(default_factory=dict)  # p50, p90, p99, max

    def as_dict(self) -> dict:
        return asdict(self)


def percentile(ordered: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list (0 for an empty one)."""
    if not ordered:
        return 0.0
    rank = max(1, -(-len(ordered) * p // 100))  # ceil(n * p / 100), at least 1
    return ordered[int(rank) - 1]


def analyse(records: list[tuple[float, bytes]], sent: int, since: float) -> Report:
    """Count and time `records` (receive time, payload) of a run that sent seqs 0..sent-1 after `since`."""
    r = Report(sent)
    seen = bytearray(sent)
    latencies: list[float] = []
    first, last = float("inf"), 0.0
    for received, payload in records:
        try:
            msg = orjson.loads(payload)
            seq, ts = int(msg["seq"]), float(msg["ts"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            r.unparsed += 1
            continue
        if ts < since or not 0 <= seq < sent:
            r.stale += 1
        elif seen[seq]:
            r.duplicates += 1
        else:
            seen[seq] = 1
            latencies.append(received - ts)
            first, last = min(first, received), max(last, received)
    r.delivered, r.lost = len(latencies), sent - len(latencies)
    r.throughput = (r.delivered - 1) / (last - first) if last > first else float(r.delivered)
    latencies.sort()
    r.latency_ms = {f"p{p}": percentile(latencies, p) * 1000 for p in (50, 90, 99)}
    r.latency_ms["max"] = latencies[-1] * 1000 if latencies else 0.0
    return r


class Receiver:
    """An MQTT client collecting results on `filters` (and counting error records on `error_filters`)."""

    def __init__(self, url: str, filters: list[str], qos: int, error_filters: tuple[str, ...] = ()) -> None:
        self.records: list[tuple[float, bytes]] = []
        self.errors = 0
        self._subscribed = threading.Event()
        c, host, port = net.client(url, f"bench-receiver-{os.getpid()}", 1000)
        self.client = c
        c.on_message = lambda _c, _u, m: self.records.append((time.time(), m.payload))
        for f in error_filters:
            c.message_callback_add(f, self._error)
        c.on_subscribe = lambda *_a: self._subscribed.set()
        c.connect(host, port, 30)
        c.loop_start()
        c.subscribe([(f, qos) for f in (*filters, *error_filters)])
        if not self._subscribed.wait(10):
            self.close()
            raise ConnectionError(f"{url}: subscription to {filters} not acknowledged")

    def _error(self, _c: mqtt.Client, _u: object, _m: mqtt.MQTTMessage) -> None:
        self.errors += 1

    def wait_for(self, n: int, idle: float = 3.0, limit: float = 120.0, grace: float = 0.3) -> None:
        """Return once `n` results arrived (plus `grace` for duplicates), or nothing came for `idle` s."""
        deadline, count, changed = time.monotonic() + limit, -1, time.monotonic()
        while time.monotonic() < deadline:
            now, have = time.monotonic(), len(self.records) + self.errors
            if have >= n:
                time.sleep(grace)
                return
            if have != count:
                count, changed = have, now
            elif now - changed > idle:
                return
            time.sleep(0.05)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
