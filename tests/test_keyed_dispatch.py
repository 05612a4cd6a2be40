"""A keyed rule's dispatch (`KeyedQueue`) against a real ZMQ ROUTER with workers as real DEALER sockets, and the
outbox's keyed commit (`Outbox.commit`) on a real SQLite file."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from pipeline.config import load as config
from pipeline.keyed import store
from pipeline.stages.egress.outbox import Entry, Keyed, Outbox
from pipeline.stages.ingress.dispatch import WORKER_SILENT
from pipeline.stages.ingress.keyed import KeyedQueue, StateReader
from pipeline.telemetry.reporter import Reporter
from pipeline.wire import frames as envelope
from pipeline.wire.frames import Message, Result

MODELS = Path(__file__).parent / "models"


@pytest.fixture
def keyed(tmp_path: Path) -> Iterator[tuple[KeyedQueue, zmq.Context, str, list[Result], Path]]:
    path = tmp_path / "stack.yaml"
    path.write_text(f"""
brokers: {{local: {{url: "mqtt://127.0.0.1:1883"}}}}
models: {{p: {{path: {MODELS}/probe}}}}
rules: [{{name: r, sub: {{broker: local, topic: "in/+", qos: 1}}, model: p, pub: {{broker: local, topic: out}},
          key: "{{1}}", max_attempts: 2}}]
""")
    rule = config.load(path).rules[0]
    ctx = zmq.Context()
    address = f"inproc://keyed-{id(tmp_path)}"
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.bind(address)
    letters: list[Result] = []
    db = tmp_path / store.OUTBOX_FILE
    q = KeyedQueue(rule, router, Reporter(ctx.socket(zmq.PUB), "ingress"), letters.append, lambda t: f"err/{t}",
                   StateReader(db))
    yield q, ctx, address, letters, db
    q.states.close()
    ctx.destroy(linger=0)


def _msg(i: int, key: str, qos: int = 1) -> Message:
    return Message(f"b-{i}", "r", "local", f"in/{key}", b"{}", qos, i + 1, 1, time.time(), key=key)


def _worker(q: KeyedQueue, ctx: zmq.Context, address: str, ident: bytes, credit: int = 64) -> zmq.Socket:
    d = ctx.socket(zmq.DEALER)
    d.setsockopt(zmq.IDENTITY, ident)
    d.setsockopt(zmq.LINGER, 0)
    d.connect(address)
    d.send(envelope.pack([envelope.CREDIT, credit]))
    who, frame = q.sock.recv_multipart()
    q.on_credit(who, envelope.unpack(frame)[1], time.monotonic())
    return d


def _got(d: zmq.Socket) -> list[Message]:
    out: list[Message] = []
    while d.poll(100):
        out += envelope.decode(d.recv(), Message)
    return out


def test_one_message_per_key_in_flight_and_the_next_goes_with_the_state_the_confirm_brought(keyed):
    q, ctx, address, _, _ = keyed
    w = _worker(q, ctx, address, b"w1")
    for i, key in enumerate(["a", "a", "b", "a", "b"]):
        q.offer(_msg(i, key))
    q.dispatch(time.monotonic())
    first = _got(w)
    assert [(m.id, m.key, m.state) for m in first] == [("b-0", "a", b""), ("b-2", "b", b"")]
    assert q.depth == 3 and q.levels()["keys"] == 2
    q.confirm("b-0", (store.encode({"n": 1}), 1))
    q.confirm("b-2", None)  # b's call left its state unchanged
    q.dispatch(time.monotonic())
    second = _got(w)
    assert [(m.id, store.decode(m.state), m.base) for m in second] == [("b-1", {"n": 1}, 1), ("b-4", {}, 0)]
    q.confirm("b-1", (store.encode({"n": 2}), 2))
    q.dispatch(time.monotonic())
    assert [(m.id, store.decode(m.state), m.base) for m in _got(w)] == [("b-3", {"n": 2}, 2)]


def test_a_key_sticks_to_its_worker_and_a_busy_key_holds_back_only_its_own(keyed):
    q, ctx, address, _, _ = keyed
    w1 = _worker(q, ctx, address, b"w1")
    q.offer(_msg(0, "hot"))
    q.dispatch(time.monotonic())
    assert [m.id for m in _got(w1)] == ["b-0"]
    w2 = _worker(q, ctx, address, b"w2")
    for i in range(1, 4):
        q.offer(_msg(i, "hot"))
    q.offer(_msg(4, "cold"))
    q.dispatch(time.monotonic())
    assert [m.id for m in _got(w2)] == ["b-4"]  # the hot key waits for its own message, not the cold one
    assert _got(w1) == []
    q.confirm("b-0")
    q.dispatch(time.monotonic())
    assert [m.id for m in _got(w1)] == ["b-1"] and _got(w2) == []  # hot stays on w1, which has credit


def test_a_dead_workers_keys_go_to_another_in_order_as_suspects(keyed):
    q, ctx, address, _, _ = keyed
    _w1 = _worker(q, ctx, address, b"w1")
    for i in range(3):
        q.offer(_msg(i, "k"))
    q.dispatch(time.monotonic())
    w2 = _worker(q, ctx, address, b"w2")
    q.workers[b"w2"].seen = time.monotonic() + 60  # w2 stays alive; w1 falls silent
    q.expire(time.monotonic() + WORKER_SILENT + 0.1)
    assert b"w1" not in q.workers
    q.dispatch(time.monotonic())
    again = _got(w2)
    assert [(m.id, m.attempt) for m in again] == [("b-0", 2)]  # the one w1 held, first, alone
    q.confirm("b-0")
    q.dispatch(time.monotonic())
    assert [(m.id, m.attempt) for m in _got(w2)] == [("b-1", 1)]


def test_a_dead_letter_or_a_lost_qos0_message_lets_its_key_go_on_and_its_state_is_read_again(keyed):
    q, ctx, address, letters, db = keyed
    _w = _worker(q, ctx, address, b"w")
    q.offer(_msg(0, "k"))
    q.offer(_msg(1, "k", qos=0))
    q.offer(_msg(2, "k"))
    q.dispatch(time.monotonic())
    q.on_timeout(b"w", "b-0", [], time.monotonic())  # attempt 1 of 2 timed out
    w2 = _worker(q, ctx, address, b"w2")
    q.dispatch(time.monotonic())
    assert [(m.id, m.attempt) for m in _got(w2)] == [("b-0", 2)]
    q.on_timeout(b"w2", "b-0", [], time.monotonic())  # attempt 2 of 2: a dead letter
    assert [r.message_id for r in letters] == ["b-0"]
    outbox = Outbox(db, 1 << 20)  # egress committed a state meanwhile: the next message must carry it
    outbox.commit([Entry(None, Keyed("r", "k", "local", 99, 1, "other", b"", False, store.encode({"n": 7}), 0))])
    outbox.close()
    w3 = _worker(q, ctx, address, b"w3")
    q.dispatch(time.monotonic())
    sent = _got(w3)
    assert [(m.id, store.decode(m.state), m.base) for m in sent] == [("b-1", {"n": 7}, 1)]
    q.on_timeout(b"w3", "b-1", [], time.monotonic())  # a QoS 0 message is not sent again: dropped
    assert q.stats.counters.get("dropped.r") == 1
    w4 = _worker(q, ctx, address, b"w4")
    q.dispatch(time.monotonic())
    assert [m.id for m in _got(w4)] == ["b-2"]


def test_clearing_the_backlog_keeps_what_is_in_flight(keyed):
    q, ctx, address, _, _ = keyed
    _w = _worker(q, ctx, address, b"w")
    for i, key in enumerate(["a", "a", "b"]):
        q.offer(_msg(i, key, qos=1 - i % 2))
    q.dispatch(time.monotonic())
    assert q.clear_backlog() == 1 and q.depth == 0 and not q.backlogged
    assert set(q.in_flight) == {"b-0", "b-2"}


def test_a_stale_result_sends_its_message_again_with_the_state_read_from_the_file(keyed):
    q, ctx, address, _, db = keyed
    w = _worker(q, ctx, address, b"w")
    q.offer(_msg(0, "k"))
    q.dispatch(time.monotonic())
    assert [(m.id, m.base) for m in _got(w)] == [("b-0", 0)]
    outbox = Outbox(db, 1 << 20)  # a late result of an earlier message of the key was stored meanwhile
    _commit(outbox, None, _keyed(9, "old-1", {"n": 5}))
    outbox.close()
    q.again_stale("b-0")  # egress: b-0's result was computed from version 0, the file holds version 1
    q.dispatch(time.monotonic())
    assert [(m.id, m.attempt, store.decode(m.state), m.base) for m in _got(w)] == [("b-0", 1, {"n": 5}, 1)]
    assert q.stats.counters.get("stale.r") == 1


def test_a_buried_worker_s_answered_messages_keep_their_deadline_and_are_not_sent_twice(keyed):
    q, ctx, address, _, _ = keyed
    _w1 = _worker(q, ctx, address, b"w1")
    q.offer(_msg(0, "a"))
    q.offer(_msg(1, "b"))
    q.dispatch(time.monotonic())
    q.on_credit(b"w1", 1, time.monotonic())  # it answered b-0: the result is on its way to egress
    w2 = _worker(q, ctx, address, b"w2")
    q.workers[b"w2"].seen = time.monotonic() + 60
    q.expire(time.monotonic() + WORKER_SILENT + 0.1)  # w1 falls silent
    q.dispatch(time.monotonic())
    assert [(m.id, m.attempt) for m in _got(w2)] == [("b-1", 2)]  # only the unanswered one
    assert q.in_flight["b-0"][1] == b"w1"  # its confirm, naming w1, is still accepted
    q.confirm("b-0")
    assert "a" not in q.lines


def test_past_the_known_keys_the_least_recently_used_idle_ones_are_forgotten(keyed, monkeypatch):
    from pipeline.stages.ingress import keyed as keyed_module

    q, ctx, address, _, _ = keyed
    monkeypatch.setattr(keyed_module, "KNOWN_KEYS", 3)
    w = _worker(q, ctx, address, b"w")
    for i, key in enumerate("abcde"):
        q.offer(_msg(i, key))
        q.dispatch(time.monotonic())
        if key != "a":
            q.confirm(f"b-{i}")  # a stays in flight
    _got(w)
    assert "a" in q.known and len(q.known) == 3 and list(q.known)[-2:] == ["d", "e"]


def _keyed(mid: int, msg_id: str, state: dict | None, dup: bool = False, digest: bytes = b"d1",
           base: int | None = None) -> Keyed:
    """A keyed QoS 1 entry of rule r, key k; `base`: the version it was computed from (default: the stored one)."""
    return Keyed("r", "k", "local", mid, 1, msg_id, digest, dup, None if state is None else store.encode(state),
                 -1 if base is None else base)


def _commit(outbox: Outbox, row: tuple | None, k: Keyed):
    if k.base == -1:
        k = k._replace(base=(store.read(outbox.db, "r", "k") or store.NONE).version)
    return outbox.commit([Entry(row, k)])


def _row(n: int) -> tuple:
    return ("local", "out", f'{{"n":{n}}}'.encode(), 1, 0, "r", time.time())


def test_the_outbox_commits_a_state_with_its_row_and_recognises_a_message_delivered_again(tmp_path):
    outbox = Outbox(tmp_path / store.OUTBOX_FILE, 1 << 20)
    first = _commit(outbox, _row(1), _keyed(5, "a-1", {"n": 1}))
    assert first.states == [[store.encode({"n": 1}), 1]] and first.state_writes == 1 and outbox.rows == 1
    again = _commit(outbox, _row(2), _keyed(5, "a-1", {"n": 2}))  # the same message, sent again by ingress
    assert again.recognised == 1 and again.states == [[store.encode({"n": 1}), 1]] and outbox.rows == 1
    dup = _commit(outbox, _row(2), _keyed(5, "b-9", {"n": 2}, dup=True))  # the broker's DUP, after a restart
    assert dup.recognised == 1 and outbox.rows == 1
    other = _commit(outbox, _row(2), _keyed(5, "b-10", {"n": 2}, dup=True, digest=b"d2"))  # not the same message
    assert other.recognised == 0 and outbox.rows == 2
    fresh = _commit(outbox, _row(3), _keyed(5, "b-11", {"n": 3}, digest=b"d1"))  # packet id reused, no DUP
    assert fresh.recognised == 0 and outbox.rows == 3
    assert store.read(outbox.db, "r", "k")[::2] == (store.encode({"n": 3}), 3)
    outbox.close()


def test_a_message_that_left_the_state_unchanged_is_recognised_too(tmp_path):
    """Its DUP must not be called on the state later messages left and change it (a reading under the limit
    ending a run that is still going)."""
    outbox = Outbox(tmp_path / store.OUTBOX_FILE, 1 << 20)
    _commit(outbox, _row(1), _keyed(1, "a-1", None))  # left the state as it was
    _commit(outbox, _row(2), _keyed(2, "a-2", {"over": 1}))
    dup = _commit(outbox, _row(3), _keyed(1, "b-1", {}, dup=True))
    assert dup.recognised == 1 and outbox.rows == 2
    assert store.decode(store.read(outbox.db, "r", "k").value) == {"over": 1}
    outbox.close()


def test_a_result_computed_from_an_older_state_stores_nothing(tmp_path):
    outbox = Outbox(tmp_path / store.OUTBOX_FILE, 1 << 20)
    _commit(outbox, _row(1), _keyed(1, "a-1", {"n": 1}))
    _commit(outbox, _row(2), _keyed(2, "a-2", {"n": 2}))
    late = _commit(outbox, _row(1), _keyed(3, "old-1", {"n": 1}, base=0))  # an earlier ingress's message, late
    assert late.states == [False] and late.stale == 1 and outbox.rows == 2
    assert store.decode(store.read(outbox.db, "r", "k").value) == {"n": 2}
    outbox.close()


def test_expired_states_count_as_empty_and_are_deleted_after_the_margin(tmp_path):
    outbox = Outbox(tmp_path / store.OUTBOX_FILE, 1 << 20)
    _commit(outbox, None, _keyed(1, "a-1", {"n": 1}))
    stored = store.read(outbox.db, "r", "k")
    assert store.current(stored, 60.0) == store.encode({"n": 1})
    assert store.current(stored, 60.0, now=stored.updated_at + 61) == b""
    assert outbox.expire_states({"r": 60.0}, 60.0) == 0
    outbox.db.execute("UPDATE state SET updated_at = updated_at - 121")
    assert outbox.expire_states({"r": 60.0}, 60.0) == 1 and store.read(outbox.db, "r", "k") is None
    outbox.close()
