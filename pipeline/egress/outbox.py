"""The durable outbox: results that are safe before they are published.

SQLite in WAL mode with synchronous=NORMAL: a commit survives any crash of our processes (the WAL is in
the OS page cache); a power cut can lose the last commits before a checkpoint (see README, "Delivery
guarantees"). One transaction per ZMQ frame of results; rows are deleted when the broker PUBACKs them.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple


class Row(NamedTuple):
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


class Outbox:
    def __init__(self, path: Path, max_bytes: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.max_bytes = path, max_bytes
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute(_SCHEMA)
        totals = "SELECT coalesce(sum(length(payload)), 0), count(*) FROM outbox"
        self.bytes, self.rows = self.db.execute(totals).fetchone()

    @property
    def full(self) -> bool:
        return self.bytes >= self.max_bytes

    def add(self, rows: Iterable[tuple[str, str, bytes, int, int, str, float]]) -> None:
        """Insert (broker, topic, payload, qos, retain, rule, received_at) rows in one transaction."""
        rows = list(rows)
        self.db.execute("BEGIN")
        self.db.executemany(
            "INSERT INTO outbox (broker, topic, payload, qos, retain, rule, received_at) VALUES (?,?,?,?,?,?,?)",
            rows)
        self.db.execute("COMMIT")
        self.rows += len(rows)
        self.bytes += sum(len(r[2]) for r in rows)

    def after(self, broker: str, cursor: int, limit: int) -> list[Row]:
        """The oldest rows for `broker` with id > cursor."""
        cur = self.db.execute("SELECT id, broker, topic, payload, qos, retain FROM outbox "
                              "WHERE broker = ? AND id > ? ORDER BY id LIMIT ?", (broker, cursor, limit))
        return [Row(*r) for r in cur]

    def delete(self, done: list[tuple[int, int]]) -> None:
        """Delete rows given as (id, payload length)."""
        self.db.execute("BEGIN")
        self.db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i, _ in done])
        self.db.execute("COMMIT")
        self.rows -= len(done)
        self.bytes -= sum(n for _, n in done)

    def close(self) -> None:
        self.db.close()
