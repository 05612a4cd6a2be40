"""GET /rules/{name}/state/{key}: the state a keyed rule keeps for one key, as egress last committed it.

The state lives in the stack's outbox file (`pipeline.keyed.store`); control opens it read-only for each request
and closes it after, so it never holds a handle on a file egress may replace, and a stack whose egress has not
made the file yet simply has no state. A state not written for the rule's `state.expire_after` counts as none,
as it does for the workers.
"""

from __future__ import annotations

import base64
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any

import falcon

from pipeline.control.http import send_json
from pipeline.keyed import store

if TYPE_CHECKING:  # pipeline.config.load loads pydantic; a stage gets its config from pipeline.config.snapshot
    from pipeline.config.load import Config, Rule


def keyed_rule(cfg: Config, name: str) -> Rule:
    """The rule `name`; 404 naming what is missing when there is no such rule or it has no `key:`."""
    rule = next((r for r in cfg.rules if r.name == name), None)
    if rule is None:
        raise falcon.HTTPNotFound(title="no such rule",
                                  description=f"no rule named '{name}' (rules: {', '.join(r.name for r in cfg.rules)})")
    if not rule.key:
        raise falcon.HTTPNotFound(title="not keyed",
                                  description=f"rule '{name}' is not keyed (it has no key:), so it keeps no state")
    return rule


def stored(path: Path, rule: str, key: str) -> store.Stored | None:
    """The stored state of (rule, key) in the state file at `path`; None when the file or the row does not exist.
    503 when the file cannot be read."""
    try:
        db = store.read_only(path)
        if db is None:
            return None
        try:
            return store.read(db, rule, key)
        finally:
            db.close()
    except sqlite3.Error as e:
        raise falcon.HTTPServiceUnavailable(title="state unavailable",
                                            description=f"the state file {path} cannot be read: {e}") from None


def plain(value: Any) -> Any:
    """A decoded state made JSON-safe: bytes become base64 strings (standard alphabet, padded), map keys become
    strings (a bytes key: base64 too), and anything else msgpack may give (an extension type) its str()."""
    if isinstance(value, dict):
        return {_text(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if value is None or isinstance(value, str | bool | int | float):
        return value
    return str(value)


def _text(key: Any) -> str:
    return key if isinstance(key, str) else plain(key) if isinstance(key, bytes) else str(key)


class KeyState:
    """GET /rules/{name}/state/{key}: `{"rule", "key", "state", "bytes", "updated_at", "version"}`, where `state`
    is the decoded map with bytes values rendered as base64 strings, `bytes` the size of its encoding (what
    `state.max_bytes` bounds), `updated_at` the unix time egress last wrote it and `version` how many writes made
    it. The key is the rest of the path,
    so a key with "/" in it (a list key, a topic level) is written as it is; other characters percent-encoded.
    404 naming what is missing: no such rule, a rule without `key:`, or no state for the key (never written, or
    expired)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.path = store.path_in(cfg.default_data_dir())

    def on_get(self, _req: falcon.Request, resp: falcon.Response, name: str, key: str) -> None:
        rule = keyed_rule(self.cfg, name)
        found = stored(self.path, name, key)
        value = store.current(found, rule.state.expire_after)
        if found is None or not value:
            raise falcon.HTTPNotFound(
                title="no state", description=f"rule '{name}' has no state for key '{key}' (none was written, or "
                f"none for the last {rule.state.expire_after:g} s, its state.expire_after)")
        send_json(resp, {"rule": name, "key": key, "state": plain(store.decode(value)), "bytes": len(value),
                         "updated_at": found.updated_at, "version": found.version})
