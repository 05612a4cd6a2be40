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

from pipeline import topics
from pipeline.config.load import Broker
from pipeline.wire.mqtt import Hub, Link


@dataclass
class Report:
    """What the receiver measured of one run: counts, losses, duplicates and latency."""

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
    """An MQTT client collecting results on `filters` (and counting error records on `error_filters`).

    It reads through the stages' own `Link` and `Hub` on a thread of its own: PUBLISH packets parsed straight
    from the socket buffer, QoS 1 acknowledged at once, so the receiver costs the shared cores little."""

    def __init__(self, url: str, filters: list[str], qos: int, error_filters: tuple[str, ...] = ()) -> None:
        self.records: list[tuple[float, bytes]] = []
        self.errors = 0
        self.error_filters = error_filters
        # MQTT 5, so that Link asks for a Receive Maximum (mqtt.RECEIVE_MAXIMUM): with 3.1.1 Mosquitto's defaults
        # allow 20 in flight and 1,000 queued, and a stall of the receiver made Mosquitto drop results
        self.link = Link("bench", Broker(url=url, protocol="5"), f"bench-receiver-{os.getpid()}", manual_ack=True)
        for f in (*filters, *error_filters):
            self.link.subscribe(f, qos)
        self.link.on_publish = self._got
        self.hub = Hub([self.link])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="receiver")
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self.link.connected:
            if time.monotonic() > deadline or not self._thread.is_alive():
                self.close()
                raise ConnectionError(f"{url}: subscription to {filters} not acknowledged ({self.link.state})")
            time.sleep(0.02)

    def _serve(self) -> None:
        while not self._stop.is_set():
            self.hub.poll(50)
            self.hub.flush()

    def _got(self, topic: str, payload: bytes, qos: int, mid: int, _dup: bool, _subs: tuple[int, ...]) -> None:
        now = time.time()
        if qos:
            self.link.client.puback(mid)
        if self.error_filters and any(topics.matches(f, topic) for f in self.error_filters):
            self.errors += 1
        else:
            self.records.append((now, payload))

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
        self._stop.set()
        self._thread.join(2)
        self.link.stop()
