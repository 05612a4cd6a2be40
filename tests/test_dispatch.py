"""Ingress's per-rule dispatch (`RuleQueue`) against a real ZMQ ROUTER, with workers as real DEALER sockets;
and when ingress reads MQTT (`ReadPace`, on a clock of the test's own)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from pipeline.config import load as config
from pipeline.stages.ingress.dispatch import WORKER_SILENT, RuleQueue
from pipeline.stages.ingress.pace import BUSY_READ_EVERY, FAST_READ_EVERY, RATE_WINDOW, ReadPace
from pipeline.telemetry.reporter import Reporter
from pipeline.wire import frames as envelope
from pipeline.wire.frames import Message

MODELS = Path(__file__).parent / "models"


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[tuple[RuleQueue, zmq.Context, str]]:
    path = tmp_path / "stack.yaml"
    path.write_text(f"""
brokers: {{local: {{url: "mqtt://127.0.0.1:1883"}}}}
models: {{p: {{path: {MODELS}/probe}}}}
rules: [{{name: r, sub: {{broker: local, topic: "in/#", qos: 1}}, model: p, pub: {{broker: local, topic: out}}}}]
""")
    rule = config.load(path).rules[0]
    ctx = zmq.Context()
    address = f"inproc://rule-{id(tmp_path)}"
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.bind(address)
    stats = Reporter(ctx.socket(zmq.PUB), "ingress")
    yield RuleQueue(rule, router, stats, lambda _r: None, lambda t: f"err/{t}"), ctx, address
    ctx.destroy(linger=0)  # closes every socket of the test, the workers' DEALERs included


def _messages(n: int, qos: int = 1) -> list[Message]:
    return [Message(f"b-{i}", "r", "local", "in/x", b"{}", qos, i + 1, 1, time.time()) for i in range(n)]


def _dealer(ctx: zmq.Context, address: str, ident: bytes) -> zmq.Socket:
    d = ctx.socket(zmq.DEALER)
    d.setsockopt(zmq.IDENTITY, ident)
    d.setsockopt(zmq.LINGER, 0)
    d.connect(address)
    return d


def test_a_worker_known_from_beats_whose_dealer_is_not_connected_yet_is_kept_and_served_later(queue):
    """After an ingress restart, a worker's heartbeat can arrive before its DEALER reconnects. The send then
    fails (ROUTER_MANDATORY); the worker must not be buried for it, or its later credit and beats would be
    ignored and the messages would wait for ever."""
    q, ctx, address = queue
    now = time.monotonic()
    q.on_beat(b"w1", 64, now)
    for m in _messages(3) + _messages(2, qos=0):
        q.offer(m)
    q.dispatch(now)
    assert b"w1" in q.workers and q.workers[b"w1"].credit == 0
    assert [m.id for m in q.pending] == ["b-0", "b-1", "b-2", "b-0", "b-1"]  # all back, in order, none dropped
    assert not q.in_flight
    dealer = _dealer(ctx, address, b"w1")
    deadline = time.monotonic() + 5
    while q.pending and time.monotonic() < deadline:
        q.on_beat(b"w1", 64, time.monotonic())  # the next heartbeat gives its credit back
        q.dispatch(time.monotonic())
        time.sleep(0.01)
    assert dealer.poll(1000)
    got = envelope.decode(dealer.recv(), Message)
    assert [(m.id, m.qos) for m in got] == [("b-0", 1), ("b-1", 1), ("b-2", 1), ("b-0", 0), ("b-1", 0)]
    assert set(q.in_flight) == {"b-0", "b-1", "b-2"}


def test_an_unreachable_worker_that_stops_beating_is_buried_and_others_take_its_messages(queue):
    q, ctx, address = queue
    now = time.monotonic()
    q.on_beat(b"gone", 64, now)
    for m in _messages(4):
        q.offer(m)
    q.dispatch(now)
    assert len(q.pending) == 4
    q.expire(now + WORKER_SILENT + 0.1)
    assert b"gone" not in q.workers
    q.on_beat(b"gone", 64, now + WORKER_SILENT + 0.2)  # a late beat does not bring it back
    assert b"gone" not in q.workers
    dealer = _dealer(ctx, address, b"w2")
    dealer.send(envelope.pack([envelope.CREDIT, 8]))
    ident, frame = q.sock.recv_multipart()
    q.on_credit(ident, envelope.unpack(frame)[1], time.monotonic())
    q.dispatch(time.monotonic())
    assert dealer.poll(1000)
    assert [m.id for m in envelope.decode(dealer.recv(), Message)] == ["b-0", "b-1", "b-2", "b-3"]


def _serve_one(q: RuleQueue, ctx: zmq.Context, address: str, ident: bytes, n: int) -> zmq.Socket:
    """A worker whose DEALER took its credit, and `n` QoS 1 messages dispatched to it. Keep the DEALER it
    returns referenced: a collected socket is closed (the fixture closes it at the end)."""
    dealer = _dealer(ctx, address, ident)
    dealer.send(envelope.pack([envelope.CREDIT, envelope.PREFETCH]))
    who, frame = q.sock.recv_multipart()
    q.on_credit(who, envelope.unpack(frame)[1], time.monotonic())
    for m in _messages(n):
        q.offer(m)
    q.dispatch(time.monotonic())
    return dealer


def test_a_message_waiting_at_a_busy_worker_never_expires_and_its_deadline_starts_when_answered(queue):
    """A slow model (seconds per call) holds a queue of messages for longer than the grace period; they must
    not go again while the worker works through them (that made duplicates and false dead letters)."""
    q, ctx, address = queue
    _worker = _serve_one(q, ctx, address, b"slow", 40)
    t0 = time.monotonic()
    later = t0 + 10 * q.grace
    q.on_beat(b"slow", envelope.PREFETCH - 40, later)  # alive and busy
    q.expire(later)
    assert not q.retry and len(q.in_flight) == 40
    q.on_credit(b"slow", 32, later)  # it answered the first frame
    for dt in (-0.1, 0.1):
        q.on_beat(b"slow", envelope.PREFETCH - 8, later + q.grace + dt)
        q.expire(later + q.grace + dt)
        if dt < 0:
            assert not q.retry
    # no confirm for those 32 within the grace period: lost after the worker (egress killed, say)
    assert sorted(m.id for m in q.retry) == sorted(f"b-{i}" for i in range(32))
    assert all(m.attempt == 2 for m in q.retry)
    assert sorted(q.in_flight) == sorted(f"b-{i}" for i in range(32, 40))  # still at the worker: no deadline


def test_messages_a_worker_never_got_go_again_once_it_says_twice_that_it_holds_nothing(queue):
    q, ctx, address = queue
    _worker = _serve_one(q, ctx, address, b"w", 5)
    t = q.workers[b"w"].sent_at
    q.on_beat(b"w", envelope.PREFETCH, t + 0.5)  # too soon after the send to believe it
    assert not q.retry
    q.on_beat(b"w", envelope.PREFETCH, t + 1.2)
    assert not q.retry  # once is not enough: its credit may be on the way
    q.on_beat(b"w", envelope.PREFETCH, t + 1.7)
    assert sorted(m.id for m in q.retry) == [f"b-{i}" for i in range(5)] and not q.in_flight
    assert q.workers[b"w"].credit >= 5  # what it never got is free room again


def test_a_restarted_egress_hastens_only_answered_messages(queue):
    q, ctx, address = queue
    _worker = _serve_one(q, ctx, address, b"w", 3)
    now = time.monotonic()
    q.on_credit(b"w", 2, now)  # b-0 and b-1 answered: their results went to the egress that died
    q.hasten(now + 1.0)
    q.on_beat(b"w", envelope.PREFETCH - 1, now + 1.1)
    q.expire(now + 1.1)
    assert sorted(m.id for m in q.retry) == ["b-0", "b-1"]
    assert list(q.in_flight) == ["b-2"]  # still at the worker: its result will go to the new egress


def test_a_timed_out_worker_s_answered_messages_get_a_finite_deadline(queue):
    """The results a worker sent before its timeout are on the way; if egress loses them, their messages
    must go again, not wait for ever (their PUBACKs, and every later one, would never be released)."""
    q, ctx, address = queue
    _worker = _serve_one(q, ctx, address, b"w", 3)
    now = time.monotonic()
    q.on_timeout(b"w", "b-2", ["b-0", "b-1"], now)  # b-2 hung the model; b-0 and b-1 were answered
    assert [m.id for m in q.retry] == ["b-2"]
    q.expire(now + q.grace + 0.1)  # no confirm came for them
    assert sorted(m.id for m in q.retry) == ["b-0", "b-1", "b-2"]


def test_a_timeout_report_from_a_worker_that_does_not_hold_the_message_resends_nothing(queue):
    q, ctx, address = queue
    _worker = _serve_one(q, ctx, address, b"w", 2)
    q.on_timeout(b"someone-else", "b-0", [], time.monotonic())
    assert not q.retry and set(q.in_flight) == {"b-0", "b-1"} and b"w" in q.workers
    assert q.stats.counters["stray_timeouts"] == 1


# ---------------------------------------------------------------------------------------------- read pace


def _pace_run(pace: ReadPace, rate: float, seconds: float, backlog: bool = False) -> list[tuple[float, bool]]:
    """Drive `pace` as ingress's loop would, every 0.1 ms, with `rate` msg/s arriving (a clock of our own)."""
    steps, t = [], 0.0
    while t < seconds:
        steps.append((t, pace.step(t, int(t * rate), backlog)))
        t += 0.0001
    return steps


def _read_gaps(steps: list[tuple[float, bool]]) -> list[float]:
    """Time from the end of each reading spell to the next read."""
    gaps, stopped = [], None
    for t, reading in steps:
        if not reading and stopped is None:
            stopped = t
        elif reading and stopped is not None:
            gaps.append(t - stopped)
            stopped = None
    return gaps


def test_light_input_is_read_as_it_comes():
    pace = ReadPace()
    steps = _pace_run(pace, rate=1000, seconds=0.2)
    assert all(reading for _, reading in steps) and not pace.fast
    assert pace.timeout_ms(0.2) == 50


def test_fast_input_is_read_in_spaced_reads():
    pace = ReadPace()
    gaps = _read_gaps(_pace_run(pace, rate=18_000, seconds=0.2))
    assert pace.fast and len(gaps) > 50
    assert all(abs(g - FAST_READ_EVERY) < 0.00015 for g in gaps), gaps


def test_a_backlog_spaces_reads_even_when_input_is_light():
    pace = ReadPace()
    gaps = _read_gaps(_pace_run(pace, rate=500, seconds=0.1, backlog=True))
    assert gaps and all(abs(g - BUSY_READ_EVERY) < 0.00015 for g in gaps), gaps


def test_spaced_reads_end_one_window_after_input_slows():
    pace = ReadPace()
    _pace_run(pace, rate=18_000, seconds=0.1)
    assert pace.fast
    t, received = 0.1, int(0.1 * 18_000)
    while t < 0.1 + 2 * RATE_WINDOW + 0.001:  # input stops
        pace.step(t, received, False)
        t += 0.0001
    assert not pace.fast and pace.step(t, received, False)
    assert pace.timeout_ms(t) == 50


def test_credit_never_lets_a_worker_hold_more_than_prefetch(queue):
    """The confirms of a frame can reach ingress before the worker's credit for it (two sockets): a heartbeat in
    between says the worker has room for PREFETCH and nothing is held. Taken as credit, and the credit added on
    top, the worker would be sent more than PREFETCH: it takes them at once and answers with a credit over
    PREFETCH, which ingress refuses (the messages then looked lost and went again)."""
    q, ctx, address = queue
    _worker = _serve_one(q, ctx, address, b"w", 40)
    w = q.workers[b"w"]
    for i in range(40):
        q.confirm(f"b-{i}")  # egress has them safe; the credit is still on its way
    q.on_beat(b"w", envelope.PREFETCH, time.monotonic())
    assert w.credit == envelope.PREFETCH - 40
    q.on_credit(b"w", 40, time.monotonic())
    assert w.credit == envelope.PREFETCH and not w.order
