"""GET /rules/{name}/state/{key} on falcon's TestClient, over a real state file written with keyed.store's schema,
and the key and state bounds /rules shows."""

from __future__ import annotations

import base64
import sqlite3
import time
from pathlib import Path

import falcon.testing
import pytest
from conftest import HERE
from test_control import Fake, healthy

from pipeline.config import load as config
from pipeline.control.app import create_app
from pipeline.keyed import store

TOKEN = "tok-0123456789abcdef-state"
LOCAL = {"Host": "localhost"}


def make_cfg(tmp_path: Path, **control: object) -> config.Config:
    local = {"broker": "local"}
    rule = {"model": "probe", "pub": {**local, "topic": "out/{1}"}}
    data = {"brokers": {"local": {"url": "mqtt://127.0.0.1:1883"}},
            "models": {"probe": {"path": str(HERE / "models" / "probe")}},
            "data_dir": str(tmp_path / "data"),
            "rules": [{**rule, "name": "devices", "sub": {**local, "topic": "in/+/+"}, "key": ["{1}", "{2}"],
                       "state": {"max_bytes": "16KiB", "expire_after": "1d"}},
                      {**rule, "name": "named", "sub": {**local, "topic": "in/+"}, "key": "deviceInfo.deviceName",
                       "key_default": "unknown"},
                      {**rule, "name": "plain", "sub": {**local, "topic": "in/+"}}]}
    if control:
        data["control"] = control
    return config.parse(data, tmp_path / "pipeline.yaml")


def write_state(cfg: config.Config, rows: list[tuple[str, str, dict, float]]) -> None:
    """Rows (rule, key, state, updated_at) in the stack's state file, made as egress makes it."""
    path = store.path_in(cfg.default_data_dir())
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    for statement in store.SCHEMA:
        db.execute(statement)
    db.executemany("INSERT INTO state (rule, key, value, updated_at, version) VALUES (?, ?, ?, ?, 1)",
                   [(rule, key, store.encode(state), at) for rule, key, state, at in rows])
    db.close()


def client(cfg: config.Config) -> falcon.testing.TestClient:
    return falcon.testing.TestClient(create_app(cfg, Fake(healthy())), headers=LOCAL)


@pytest.fixture
def cfg(tmp_path: Path) -> config.Config:
    return make_cfg(tmp_path)


def test_a_keys_state_is_shown_decoded_with_its_size_and_time(cfg):
    now = time.time()
    write_state(cfg, [("named", "pump-3", {"over": 2, "last": [31.5, 32.0], "ok": None}, now - 60),
                      ("named", "pump-4", {"over": 0}, now)])
    r = client(cfg).simulate_get("/rules/named/state/pump-3")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    assert r.json == {"rule": "named", "key": "pump-3", "state": {"over": 2, "last": [31.5, 32.0], "ok": None},
                      "bytes": len(store.encode({"over": 2, "last": [31.5, 32.0], "ok": None})),
                      "updated_at": pytest.approx(now - 60), "version": 1}


@pytest.mark.parametrize("path", ["/rules/devices/state/site1/dev7", "/rules/devices/state/site1%2Fdev7"])
def test_a_key_with_a_slash_is_the_rest_of_the_path_plain_or_percent_encoded(cfg, path):
    write_state(cfg, [("devices", "site1/dev7", {"n": 7}, time.time()), ("devices", "site1", {"n": 1}, time.time())])
    r = client(cfg).simulate_get(path)
    assert r.status_code == 200, r.text
    assert (r.json["key"], r.json["state"]) == ("site1/dev7", {"n": 7})


def test_percent_encoded_characters_of_a_key_are_decoded(cfg):
    write_state(cfg, [("named", "Gärt 1?#%+", {"n": 1}, time.time())])
    r = client(cfg).simulate_get("/rules/named/state/G%C3%A4rt%201%3F%23%25+")
    assert r.status_code == 200, r.text
    assert r.json["key"] == "Gärt 1?#%+"


def test_bytes_in_a_state_are_base64_strings(cfg):
    blob = bytes(range(256))
    write_state(cfg, [("named", "cam", {"frame": blob, "nested": {"tags": [b"\x00\xff", "text"]}}, time.time())])
    state = client(cfg).simulate_get("/rules/named/state/cam").json["state"]
    assert state == {"frame": base64.b64encode(blob).decode(), "nested": {"tags": ["AP8=", "text"]}}
    assert base64.b64decode(state["frame"]) == blob


def test_an_unknown_rule_is_404_naming_it_and_the_rules(cfg):
    r = client(cfg).simulate_get("/rules/nope/state/k")
    assert r.status_code == 404
    assert r.json["title"] == "no such rule"
    assert "'nope'" in r.json["description"] and "devices, named, plain" in r.json["description"]


def test_a_rule_without_key_is_404_saying_it_is_not_keyed(cfg):
    write_state(cfg, [("plain", "k", {"n": 1}, time.time())])  # even a row (which egress never writes) is not shown
    r = client(cfg).simulate_get("/rules/plain/state/k")
    assert r.status_code == 404
    assert r.json["title"] == "not keyed"
    assert "'plain' is not keyed" in r.json["description"] and "key:" in r.json["description"]


def test_a_key_without_state_is_404(cfg):
    write_state(cfg, [("named", "pump-3", {"n": 1}, time.time()), ("devices", "pump-4", {"n": 1}, time.time())])
    c = client(cfg)
    for path in ("/rules/named/state/pump-4", "/rules/named/state/pump", "/rules/named/state/"):
        r = c.simulate_get(path)
        assert r.status_code == 404, path
        assert r.json["title"] == "no state" and "rule 'named' has no state for key" in r.json["description"]


def test_no_state_file_yet_is_no_state_and_makes_no_file(cfg):
    r = client(cfg).simulate_get("/rules/named/state/pump-3")
    assert r.status_code == 404 and r.json["title"] == "no state"
    assert not store.path_in(cfg.default_data_dir()).exists()


def test_a_state_file_without_the_state_table_is_no_state(cfg):
    path = store.path_in(cfg.default_data_dir())
    path.parent.mkdir(parents=True)
    sqlite3.connect(path).execute("CREATE TABLE outbox (id INTEGER)").connection.close()  # an egress of before
    assert client(cfg).simulate_get("/rules/named/state/pump-3").status_code == 404


def test_a_state_older_than_expire_after_is_404(cfg):
    now = time.time()
    day = 86400.0  # rule devices: expire_after 1d; rule named: the default 7d
    write_state(cfg, [("devices", "a/old", {"n": 1}, now - day - 60), ("devices", "a/young", {"n": 2}, now - day + 60),
                      ("named", "old", {"n": 3}, now - 2 * day)])
    c = client(cfg)
    r = c.simulate_get("/rules/devices/state/a/old")
    assert r.status_code == 404 and r.json["title"] == "no state" and "86400 s" in r.json["description"]
    assert c.simulate_get("/rules/devices/state/a/young").json["state"] == {"n": 2}
    assert c.simulate_get("/rules/named/state/old").json["state"] == {"n": 3}  # 2 days < 7 days


def test_with_protect_reads_the_state_needs_the_token(tmp_path):
    cfg = make_cfg(tmp_path, token=TOKEN, protect_reads=True)
    write_state(cfg, [("named", "pump-3", {"n": 1}, time.time())])
    c = client(cfg)
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": TOKEN}):
        r = c.simulate_get("/rules/named/state/pump-3", headers={**LOCAL, **headers})
        assert r.status_code == 403 and r.json["title"] == "token required", headers
        assert "pump-3" not in r.text
    assert c.simulate_get("/rules/nope/state/k").status_code == 403  # nothing is told before the token
    r = c.simulate_get("/rules/named/state/pump-3", headers={**LOCAL, "Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and r.json["state"] == {"n": 1}


def test_without_protect_reads_the_state_is_open_like_the_other_reads(tmp_path):
    cfg = make_cfg(tmp_path, token=TOKEN)
    write_state(cfg, [("named", "pump-3", {"n": 1}, time.time())])
    assert client(cfg).simulate_get("/rules/named/state/pump-3").status_code == 200


def test_rules_show_the_key_its_default_and_the_state_bounds(cfg):
    by_name = {r["name"]: r for r in client(cfg).simulate_get("/rules").json["rules"]}
    assert {k: by_name["devices"][k] for k in ("key", "key_default", "state")} == {
        "key": ["{1}", "{2}"], "key_default": None, "state": {"max_bytes": 16384, "expire_after_s": 86400.0}}
    assert {k: by_name["named"][k] for k in ("key", "key_default", "state")} == {
        "key": ["deviceInfo.deviceName"], "key_default": "unknown",
        "state": {"max_bytes": 65536, "expire_after_s": 7 * 86400.0}}
    assert {k: by_name["plain"][k] for k in ("key", "key_default", "state")} == {
        "key": None, "key_default": None, "state": None}
