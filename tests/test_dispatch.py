"""Ingress's per-rule dispatch (`RuleQueue`) against a real ZMQ ROUTER, with workers as real DEALER sockets."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from pipeline import config, envelope
from pipeline.envelope import Message
from pipeline.ingress.dispatch import WORKER_SILENT, RuleQueue
from pipeline.stats import Reporter

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
    stats.sock.close(0)
    router.close(0)
    ctx.term()


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
    try:
        deadline = time.monotonic() + 5
        while q.pending and time.monotonic() < deadline:
            q.on_beat(b"w1", 64, time.monotonic())  # the next heartbeat gives its credit back
            q.dispatch(time.monotonic())
            time.sleep(0.01)
        assert dealer.poll(1000)
        got = envelope.decode(dealer.recv(), Message)
        assert [(m.id, m.qos) for m in got] == [("b-0", 1), ("b-1", 1), ("b-2", 1), ("b-0", 0), ("b-1", 0)]
        assert set(q.in_flight) == {"b-0", "b-1", "b-2"}
    finally:
        dealer.close()


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
    try:
        dealer.send(envelope.pack([envelope.CREDIT, 8]))
        ident, frame = q.sock.recv_multipart()
        q.on_credit(ident, envelope.unpack(frame)[1], time.monotonic())
        q.dispatch(time.monotonic())
        assert dealer.poll(1000)
        assert [m.id for m in envelope.decode(dealer.recv(), Message)] == ["b-0", "b-1", "b-2", "b-3"]
    finally:
        dealer.close()
