"""`pipeline loadgen`: fake telemetry on MQTT at an even, steady rate.

Message i is due at t0 + i/rate (an absolute schedule, so sleeping errors do not accumulate). The sender
waits only when it is ahead; when it falls behind by more than SLACK it does not burst to catch up: the
schedule slips and the slip is reported. One thread drives paho by hand (no loop thread, no wake-up byte
per message): each message is written straight into FastClient's send buffer (QoS 1 with `publish1`, so
paho keeps no per-message state; at most MAX_INFLIGHT await their PUBACK), and PUBACKs are read while it
waits.

Every message carries `seq` (0..n-1) and `ts` (send time, unix seconds) so a receiver can count loss,
duplicates and latency.
"""

from __future__ import annotations

import os
import select
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import orjson
import paho.mqtt.client as mqtt

from pipeline.commands.bench import net

SLACK = 0.005  # seconds behind schedule the sender may catch up on; beyond it the schedule slips
POLL_EVERY = 32  # messages between two non-blocking reads of the socket (PUBACKs) when not waiting
MAX_INFLIGHT = 1000  # QoS 1 messages awaiting their PUBACK; the sender waits beyond it
UNBOUNDED = 10**12

Builder = Callable[[int, str, float], bytes]


@dataclass
class Options:
    """What `pipeline loadgen` sends: broker, topic, devices, rate, count or duration, QoS, shape, size."""

    url: str = "mqtt://127.0.0.1:1883"
    topic: str = "plant/{device}/telemetry"
    devices: int = 100
    rate: float = 1000.0  # messages per second; 0 = as fast as possible
    count: int = 10_000
    duration: float | None = None  # stop after this many seconds even if `count` is not reached
    qos: int = 0
    shape: str = "flat"
    payload_bytes: int = 0  # pad messages to about this size; 0 = no padding
    client_id: str = field(default_factory=lambda: f"loadgen-{os.getpid()}")


@dataclass
class Summary:
    """What a load generation run sent, and how fast."""

    url: str
    qos: int
    shape: str
    target_rate: float  # 0 = unpaced
    sent: int = 0
    acked: int = 0  # QoS 1: PUBACKs received; QoS 0: messages written to the socket
    started: float = 0.0  # unix time of the first send
    duration: float = 0.0  # seconds from the first send to the last
    max_behind: float = 0.0  # worst lateness of a send against its schedule, seconds
    slipped: float = 0.0  # seconds the schedule was pushed back because the sender fell behind
    queue_full: int = 0  # times MAX_INFLIGHT messages awaited their PUBACK and the sender waited
    refused: int = 0  # QoS 1 over MQTT 5: PUBACKs with a failure reason code
    payload_bytes: int = 0  # size of the first message

    @property
    def achieved_rate(self) -> float:
        return (self.sent - 1) / self.duration if self.duration > 0 and self.sent > 1 else float(self.sent)

    def as_dict(self) -> dict:
        return {**asdict(self), "achieved_rate": self.achieved_rate}


def builder(shape: str, payload_bytes: int = 0) -> Builder:
    """(seq, device, ts) -> JSON bytes of the given shape, padded to about `payload_bytes`."""

    def flat(seq: int, device: str, ts: float, pad: str = "") -> bytes:
        msg = {"seq": seq, "ts": ts, "deviceName": device, "pointName": "temperature", "value": 20 + seq % 100 / 10}
        return orjson.dumps({**msg, "pad": pad} if pad else msg)

    def pyboot(seq: int, device: str, ts: float, pad: str = "") -> bytes:
        msg = {"deviceInfo": {"deviceName": device, "deviceType": "sensor"},
               "telemetry": {"ts": int(ts * 1000), "temperature": 20 + seq % 100 / 10}, "seq": seq, "ts": ts}
        return orjson.dumps({**msg, "pad": pad} if pad else msg)

    shapes = {"flat": flat, "pyboot": pyboot}
    if shape not in shapes:
        raise ValueError(f"unknown shape {shape!r} (expected flat or pyboot)")
    make = shapes[shape]
    base = len(make(1000, "d10", time.time(), "x")) - 1  # a typical message; seq and ts vary a little
    if payload_bytes <= base:
        return make
    pad = "x" * (payload_bytes - base)
    return lambda seq, device, ts: make(seq, device, ts, pad)


class Pacer:
    """The absolute schedule t0 + i/rate; `delay(i, now)` says how long to wait before send i."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.t0 = 0.0
        self.max_behind = 0.0
        self.slipped = 0.0

    def start(self, now: float) -> None:
        self.t0 = now

    def delay(self, i: int, now: float) -> float:
        if not self.interval:
            return 0.0
        late = now - (self.t0 + i * self.interval)
        if late < 0:
            return -late
        self.max_behind = max(self.max_behind, late)
        if late > SLACK:  # do not burst to catch up: move the whole schedule
            self.t0 += late - SLACK
            self.slipped += late - SLACK
        return 0.0


class LoadGen:
    """Publishes a paced load of events to a broker on one MQTT connection."""

    def __init__(self, opts: Options, progress: Callable[[int], None] | None = None) -> None:
        self.opts = opts
        self.progress = progress or (lambda _sent: None)
        self.summary = Summary(opts.url, opts.qos, opts.shape, opts.rate)
        self.build = builder(opts.shape, opts.payload_bytes)
        self.devices = [f"d{k}" for k in range(opts.devices)]
        self.topics = [opts.topic.replace("{device}", d) for d in self.devices]
        self.connected, self.refused = False, ""
        self._misc_at, self.in_flight = 0.0, 0
        c, self.host, self.port = net.client(opts.url, opts.client_id, MAX_INFLIGHT)
        self.client = c
        c.on_connect = self._on_connect
        c.on_puback = self._on_puback

    def _on_connect(self, _c: mqtt.Client, _u: object, _f: object, rc: mqtt.ReasonCode, _p: object) -> None:
        self.connected, self.refused = not rc.is_failure, "" if not rc.is_failure else str(rc)

    def _on_puback(self, _mid: int, reason: int) -> None:
        self.summary.acked += 1  # QoS 1: its PUBACK (QoS 0 messages are counted when written, in send())
        if reason >= 0x80:
            self.summary.refused += 1  # MQTT 5: the broker did not take it (not authorized, quota exceeded)
        self.in_flight -= 1

    def connect(self, timeout: float = 10.0) -> None:
        self.client.connect(self.host, self.port, keepalive=30)
        deadline = time.monotonic() + timeout
        while not self.connected:
            if self.refused or time.monotonic() > deadline:
                raise ConnectionError(f"{self.opts.url}: {self.refused or 'no CONNACK'}")
            self.service(0.05)

    def service(self, timeout: float) -> None:
        """Wait up to `timeout` for the socket; read what arrived (PUBACKs), write what is pending."""
        c = self.client
        sock = c.socket()
        if sock is None:
            raise ConnectionError(f"{self.opts.url}: connection lost")
        readable, writable, _ = select.select([sock], [sock] if c.want_write() or c.unflushed() else [], [], timeout)
        if readable and not c.read(None):
            raise ConnectionError(f"{self.opts.url}: connection lost")
        if writable and c.loop_write() != mqtt.MQTT_ERR_SUCCESS:
            raise ConnectionError(f"{self.opts.url}: connection lost")
        self._flush()
        now = time.monotonic()
        if now >= self._misc_at:
            self._misc_at = now + 1.0
            c.loop_misc()

    def send(self, seq: int) -> None:
        k = seq % len(self.topics)
        payload = self.build(seq, self.devices[k], time.time())
        if self.opts.qos == 0:  # written straight into the send buffer, as egress does (no paho bookkeeping)
            if not self.client.publish0(self.topics[k], payload):
                raise ConnectionError(f"{self.opts.url}: connection lost")
            self.summary.acked += 1
        else:
            self._publish1(self.topics[k], payload)
        self._flush()  # write it now: messages leave evenly paced, not in bursts
        while self.client.want_write() or self.client.unflushed():  # socket full: wait (backpressure)
            self.service(0.01)

    def _flush(self) -> None:
        """Write what FastClient gathered (paho's packets wait in its buffer until flushed)."""
        try:
            self.client.flush()
        except OSError as e:
            raise ConnectionError(f"{self.opts.url}: connection lost ({e})") from None

    def _publish1(self, topic: str, payload: bytes) -> None:
        while self.in_flight >= MAX_INFLIGHT:
            self.summary.queue_full += 1
            self.service(0.001)
        if not self.client.publish1(topic, payload):
            raise ConnectionError(f"{self.opts.url}: connection lost")
        self.in_flight += 1

    def run(self) -> Summary:
        """Send, then wait for every PUBACK (QoS 1) or socket write (QoS 0)."""
        s, pacer = self.summary, Pacer(self.opts.rate)
        s.payload_bytes = len(self.build(0, self.devices[0], time.time()))
        start = time.perf_counter()
        deadline = start + self.opts.duration if self.opts.duration else float("inf")
        pacer.start(start)
        s.started = time.time()
        last = start
        for i in range(self.opts.count):
            self._wait_until(pacer, i)
            if (now := time.perf_counter()) >= deadline:
                break
            self.send(i)
            s.sent, last = i + 1, now
            if i % POLL_EVERY == 0:
                self.service(0)
                self.progress(s.sent)
        s.duration, s.max_behind, s.slipped = last - start, pacer.max_behind, pacer.slipped
        self.drain()
        self.progress(s.sent)
        return s

    def _wait_until(self, pacer: Pacer, i: int) -> None:
        while (wait := pacer.delay(i, time.perf_counter())) > 0:
            self.service(wait)

    def drain(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.summary.acked < self.summary.sent and time.monotonic() < deadline:
            self.service(0.05)

    def close(self) -> None:
        if self.client.socket() is not None:
            self.client.disconnect()
            deadline = time.monotonic() + 2.0
            while self.client.socket() is not None and time.monotonic() < deadline:
                try:
                    self.service(0.05)
                except ConnectionError:
                    break


def describe(s: Summary) -> list[str]:
    """The lines of the summary printed at the end."""
    target = f"target {s.target_rate:g} msg/s" if s.target_rate else "unpaced"
    what = "PUBACKs" if s.qos else "written"
    lines = [
        f"sent {s.sent} messages (QoS {s.qos}, {s.shape}, {s.payload_bytes} B) to {s.url} in {s.duration:.3f} s: "
        f"{s.achieved_rate:,.0f} msg/s ({target})",
        f"{what}: {s.acked}/{s.sent}; behind schedule: worst {s.max_behind * 1000:.1f} ms, schedule slipped "
        f"{s.slipped:.3f} s in total (slack {SLACK * 1000:g} ms); {MAX_INFLIGHT} in flight {s.queue_full} time(s)",
    ]
    if s.refused:
        lines.append(f"REFUSED by the broker (PUBACK reason >= 0x80): {s.refused} message(s)")
    return lines


@contextmanager
def _progress_bar(opts: Options, show: bool) -> Iterator[Callable[[int], None]]:
    """A rich progress bar updated at most 10 times a second (a no-op callback when not shown)."""
    if not show:
        yield lambda _sent: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    total = opts.count if opts.count < UNBOUNDED else None
    with Progress(TextColumn("[bold]loadgen"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
        task = bar.add_task("send", total=total)
        state = {"next": 0.0, "sent": 0}

        def update(sent: int) -> None:
            state["sent"] = sent
            now = time.monotonic()
            if now >= state["next"]:
                state["next"] = now + 0.1
                bar.update(task, completed=sent)

        yield update
        bar.update(task, completed=state["sent"], total=total or state["sent"], refresh=True)


def _run(opts: Options, show: bool) -> Summary:
    with _progress_bar(opts, show) as progress:
        gen = LoadGen(opts, progress)
        try:
            gen.connect()
            summary = gen.run()
        finally:
            gen.close()
    return summary


def main(opts: Options, json_out: str | None = None, quiet: bool = False) -> int:
    """Run the load generator; print and optionally write the summary. Exit 1 if not every send completed."""
    try:
        summary = _run(opts, sys.stdout.isatty() and not quiet)
    except (ConnectionError, OSError, ValueError) as e:
        print(f"loadgen: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("loadgen: interrupted", file=sys.stderr)
        return 130
    if not quiet:
        print("\n".join(describe(summary)))
    if json_out:
        with open(json_out, "wb") as f:
            f.write(orjson.dumps(summary.as_dict(), option=orjson.OPT_INDENT_2))
    return 0 if summary.acked == summary.sent else 1
