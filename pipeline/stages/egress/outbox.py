"""The durable outbox: results that are safe before they are published.

SQLite in WAL mode. With synchronous=FULL (the default) a commit is on disk before egress confirms it, so it
survives a power cut; with NORMAL a commit survives any crash of our processes (the WAL is in the OS page
cache) but a power cut can lose the last commits before a checkpoint, results whose inputs were already
acknowledged upstream (see README, "Delivery guarantees"). One transaction per ZMQ frame of results; rows
are deleted when the broker PUBACKs them.
The results of a keyed rule commit their key's new state in the same transaction (tables `state` and `done`,
see pipeline.keyed.store); one that `done` shows was committed already (delivered again) writes nothing.
A row the broker will never take is moved to the `set_aside` table (with why), so that it cannot block the
rows behind it; that table keeps the newest SET_ASIDE_KEPT rows. A failed write rolls back: no transaction
is ever left open. The file and its -wal/-shm companions are mode 0600 in a 0700 folder: payloads are this
user's alone, whatever the umask was when an older version made them.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from pipeline.keyed import store

_TOTALS = "SELECT coalesce(sum(length(payload)), 0), count(*) FROM outbox"
_INSERT = "INSERT INTO outbox (broker, topic, payload, qos, retain, rule, received_at) VALUES (?,?,?,?,?,?,?)"


class Keyed(NamedTuple):
    """What a keyed rule's result writes besides its outbox row: the key's new state (None: unchanged), stored only
    if the key's state is still at version `base`, and, for a QoS 1 input, the `done` row by which a second
    delivery of the same message is recognised."""

    rule: str
    key: str
    broker: str
    mid: int
    qos: int
    message_id: str
    digest: bytes
    dup: bool
    state: bytes | None
    base: int


STALE = False  # a keyed result computed from a state that is no longer the stored one: nothing of it was stored


class Entry(NamedTuple):
    """One result as the outbox takes it: its row (None: nothing to publish later) and its keyed part."""

    row: tuple[str, str, bytes, int, int, str, float] | None
    keyed: Keyed | None


class Committed(NamedTuple):
    """What `Outbox.commit` did: per entry, what to confirm to ingress of its key's state (None: unchanged; [value,
    version] as stored, after a write or for a result recognised as delivered again; STALE: the result was not
    stored), and how many results were recognised, how many were stale, how many states were written."""

    states: list[list | bool | None]
    recognised: int
    stale: int
    state_writes: int


class Row(NamedTuple):
    """One stored result waiting for its broker: the publish and what confirming it needs."""

    id: int
    broker: str
    topic: str
    payload: bytes
    qos: int
    retain: int


_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    broker TEXT NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL,
    qos INTEGER NOT NULL, retain INTEGER NOT NULL, rule TEXT NOT NULL, received_at REAL NOT NULL
)"""


_SET_ASIDE = """
CREATE TABLE IF NOT EXISTS set_aside (
    id INTEGER PRIMARY KEY, broker TEXT, topic, payload, qos INTEGER, retain INTEGER, rule TEXT,
    received_at REAL, reason TEXT NOT NULL, set_aside_at REAL NOT NULL
)"""
SET_ASIDE_KEPT = 10_000
SHOWN_SET_ASIDE = 5  # the newest rows set aside, shown in /stages (egress.outbox.set_aside_last)


def _private(path: Path) -> None:
    """Make the outbox's folder (0700) and file (0600) before SQLite opens it (its companions take its mode)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
    except FileExistsError:
        for f in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            if f.exists():
                os.chmod(f, 0o600)


class Outbox:
    """The SQLite file of results waiting for their broker: rows added per frame, read oldest first per broker,
    deleted on PUBACK, set aside when unpublishable; `rows` and `bytes` count what waits."""

    def __init__(self, path: Path, max_bytes: int, synchronous: str = "full") -> None:
        _private(path)
        self.path, self.max_bytes = path, max_bytes
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'full' else 'NORMAL'}")
        for table in (_SCHEMA, _SET_ASIDE, *store.SCHEMA):
            self.db.execute(table)
        self.set_aside_rows = self.db.execute("SELECT count(*) FROM set_aside").fetchone()[0]
        self.set_aside_last = [  # the newest few, for /stages
            {"id": i, "rule": rule, "topic": str(topic)[:200], "reason": reason, "at": at}
            for i, rule, topic, reason, at in self.db.execute(
                "SELECT id, rule, topic, reason, set_aside_at FROM set_aside ORDER BY id DESC LIMIT ?",
                (SHOWN_SET_ASIDE,))]
        self.bytes, self.rows = self.db.execute(_TOTALS).fetchone()

    @property
    def full(self) -> bool:
        return self.bytes >= self.max_bytes

    def add(self, rows: Iterable[tuple[str, str, bytes, int, int, str, float]]) -> None:
        """Insert (broker, topic, payload, qos, retain, rule, received_at) rows in one transaction."""
        rows = list(rows)
        with self._transaction():
            self.db.executemany(_INSERT, rows)
        self.rows += len(rows)
        self.bytes += sum(len(r[2]) for r in rows)

    def commit(self, entries: list[Entry]) -> Committed:
        """Write a frame's entries in one transaction: rows, keyed states and done rows. A keyed result recognised
        as delivered again, or computed from a state that is no longer the stored one, writes nothing."""
        if not any(e.keyed for e in entries):
            self.add([e.row for e in entries if e.row is not None])
            return Committed([None] * len(entries), 0, 0, 0)
        states: list[list | bool | None] = []
        rows: list[tuple] = []
        counts = {"recognised": 0, "stale": 0, "state_writes": 0}
        now = time.time()
        with self._transaction():
            for e in entries:
                answer, stored = self._keyed(e.keyed, now, counts) if e.keyed is not None else (None, True)
                if stored and e.row is not None:
                    self.db.execute(_INSERT, e.row)
                    rows.append(e.row)
                states.append(answer)
        self.rows += len(rows)
        self.bytes += sum(len(r[2]) for r in rows)
        return Committed(states, counts["recognised"], counts["stale"], counts["state_writes"])

    def _keyed(self, k: Keyed, now: float, counts: dict[str, int]) -> tuple[list | bool | None, bool]:
        """Store the keyed part of a result (in the open transaction). Return what to confirm of the key's state,
        and whether the result's row is to be stored (not when it was recognised as done, or is stale)."""
        stored = store.read(self.db, k.rule, k.key) or store.NONE
        if k.qos and self._done(k):
            counts["recognised"] += 1
            return [stored.value, stored.version], False
        if k.base != stored.version:
            counts["stale"] += 1
            return STALE, False
        if k.qos:
            self.db.execute("INSERT OR REPLACE INTO done (rule, broker, mid, message_id, digest) VALUES (?,?,?,?,?)",
                            (k.rule, k.broker, k.mid, k.message_id, k.digest))
        if k.state is None:
            return None, True
        self.db.execute("INSERT OR REPLACE INTO state (rule, key, value, updated_at, version) VALUES (?,?,?,?,?)",
                        (k.rule, k.key, k.state, now, k.base + 1))
        counts["state_writes"] += 1
        return [k.state, k.base + 1], True

    def _done(self, k: Keyed) -> bool:
        """Whether a result of the message of `k` was stored already: the same message id (ingress sent it again),
        or the broker's DUP with the packet id, topic and payload of the one stored under that id."""
        row = self.db.execute("SELECT message_id, digest FROM done WHERE rule = ? AND broker = ? AND mid = ?",
                              (k.rule, k.broker, k.mid)).fetchone()
        return row is not None and (row[0] == k.message_id or (k.dup and bytes(row[1]) == k.digest))

    def expire_states(self, expire_after: dict[str, float], margin: float) -> int:
        """Delete the states of each rule not written for its `expire_after` plus `margin` seconds (readers count
        them as empty from `expire_after` on); return how many went."""
        now = time.time()
        with self._transaction():
            return sum(self.db.execute("DELETE FROM state WHERE rule = ? AND updated_at < ?",
                                       (rule, now - after - margin)).rowcount for rule, after in expire_after.items())

    def after(self, broker: str, cursor: int, limit: int) -> list[Row]:
        """The oldest rows for `broker` with id > cursor."""
        cur = self.db.execute("SELECT id, broker, topic, payload, qos, retain FROM outbox "
                              "WHERE broker = ? AND id > ? ORDER BY id LIMIT ?", (broker, cursor, limit))
        return [Row(*r) for r in cur]

    def delete(self, done: list[tuple[int, int]]) -> None:
        """Delete rows given as (id, payload length)."""
        with self._transaction():
            gone = self.db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i, _ in done]).rowcount
        if gone == len(done):
            self.rows -= gone
            self.bytes -= sum(n for _, n in done)
        else:  # some were gone already (acknowledged twice across a reconnect): count again
            self.bytes, self.rows = self.db.execute(_TOTALS).fetchone()

    def by_id(self, ids: list[int], with_rule: bool = False) -> list[Any]:
        """The rows with these ids still in the outbox, oldest first; with `with_rule`, (row, rule) pairs."""
        marks = ",".join("?" * len(ids))
        cur = self.db.execute(f"SELECT id, broker, topic, payload, qos, retain, rule FROM outbox WHERE id IN ({marks}) "
                              "ORDER BY id", ids)
        return [(Row(*r[:6]), r[6]) if with_rule else Row(*r[:6]) for r in cur]

    def set_aside(self, row_id: int, size: int, reason: str, record: tuple | None = None) -> None:
        """Move row `row_id` (`size` payload bytes) to the set_aside table with `reason`, and add `record` (a row
        for `add`: its error record) in the same transaction."""
        found = self.db.execute("SELECT rule, topic FROM outbox WHERE id = ?", (row_id,)).fetchone()
        if found is None:
            return
        now = time.time()
        with self._transaction():
            self.db.execute("INSERT OR REPLACE INTO set_aside SELECT id, broker, topic, payload, qos, retain, rule, "
                            "received_at, ?, ? FROM outbox WHERE id = ?", (reason[:1000], now, row_id))
            self.db.execute("DELETE FROM outbox WHERE id = ?", (row_id,))
            if record is not None:
                self.db.execute(_INSERT, record)
            self.db.execute("DELETE FROM set_aside WHERE id <= (SELECT id FROM set_aside ORDER BY id DESC "
                            "LIMIT 1 OFFSET ?)", (SET_ASIDE_KEPT,))
        self.rows += (record is not None) - 1
        self.bytes += (len(record[2]) if record is not None else 0) - size
        self.set_aside_rows = min(self.set_aside_rows + 1, SET_ASIDE_KEPT)
        shown = {"id": row_id, "rule": found[0], "topic": str(found[1])[:200], "reason": reason[:300], "at": now}
        self.set_aside_last = [shown, *self.set_aside_last][:SHOWN_SET_ASIDE]

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self.db.execute("BEGIN")
        try:
            yield
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:  # SQLite may have rolled back itself (a full disk)
                self.db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self.db.close()
