"""Where per-key state lives: two tables in the outbox's SQLite file, so that a result and the state it leaves
are committed in one transaction (egress is the only writer; ingress and control only read).

`state`: (rule, key) -> the state map (msgpack), when it was last written, and its version (1 for the first
write, one more at each). A state last written more than the rule's `state.expire_after` ago counts as empty
(every reader applies this), and egress deletes such rows. A result names the version its call started from
(`base`; 0: no row): egress stores it only when that is still the stored version, so a result computed from a
state that changed since (a late result of a message sent again meanwhile) never overwrites a newer one.
`done`: (rule, input broker, packet id) -> the message whose result was stored last under that packet id (every
keyed QoS 1 result, whether its call changed the state or not), with the digest of its topic and payload: a
message delivered again (the same id sent again by ingress, or the broker's DUP with the same packet id, topic
and payload) is recognised as done, and its second result is dropped rather than applied twice. A packet id is
reused only after its message was acknowledged, so the table holds at most 65,535 rows per rule and broker.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any, NamedTuple

import msgpack

OUTBOX_FILE = "outbox.sqlite3"  # in the stack's data directory

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS state (
        rule TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL, updated_at REAL NOT NULL,
        version INTEGER NOT NULL, PRIMARY KEY (rule, key)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS done (
        rule TEXT NOT NULL, broker TEXT NOT NULL, mid INTEGER NOT NULL, message_id TEXT NOT NULL,
        digest BLOB NOT NULL, PRIMARY KEY (rule, broker, mid)
    ) WITHOUT ROWID""",
)


def path_in(data_dir: Path) -> Path:
    """The outbox (and state) file of a stack whose data directory is `data_dir`."""
    return data_dir / OUTBOX_FILE


class Stored(NamedTuple):
    """A key's state as stored: the msgpack map, when it was written (unix time), and its version."""

    value: bytes
    updated_at: float
    version: int


NONE = Stored(b"", 0.0, 0)  # a key without a stored state


def encode(state: dict[str, Any]) -> bytes:
    """A state map as stored and sent (msgpack); TypeError or ValueError when it holds what msgpack cannot carry."""
    return msgpack.packb(state, use_bin_type=True, strict_types=False)


def decode(value: bytes) -> dict[str, Any]:
    """The map of an encoded state (empty for b"")."""
    if not value:
        return {}
    state = msgpack.unpackb(value, raw=False, strict_map_key=False)
    return state if isinstance(state, dict) else {}


def current(stored: Stored | None, expire_after: float, now: float | None = None) -> bytes:
    """The state to use: the stored value, or b"" (empty) when there is none or it expired."""
    if stored is None or (now or time.time()) - stored.updated_at > expire_after:
        return b""
    return stored.value


def read_only(path: Path) -> sqlite3.Connection | None:
    """A read-only connection to the state file, or None when egress has not made it yet."""
    if not path.exists():
        return None
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA busy_timeout=1000")
    return db


def read(db: sqlite3.Connection, rule: str, key: str) -> Stored | None:
    """The stored state of (rule, key), or None (no such row, or no state table yet)."""
    try:
        row = db.execute("SELECT value, updated_at, version FROM state WHERE rule = ? AND key = ?",
                         (rule, key)).fetchone()
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):
            return None
        raise
    return Stored(bytes(row[0]), row[1], row[2]) if row else None
