"""Record and replay: a running stack's tap (bounds, token), a recording from the broker, replays that count exactly
the messages a model change affects, --max-diff, and capture files that are not what they claim."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import msgpack
import orjson
import pytest
from conftest import HERE, cli

from pipeline.rollout import capture, taps
from pipeline.stages.ingress import tap as tap_mod

TOKEN = "tok-record-0123456789abcdef"
STACK = """
brokers:
  local: {url: BROKER}
models:
  level: {path: MODELS/level_v1, params: {limit: 50}}
  level2: {path: MODELS/level_v2, params: {limit: 50}}
rules:
  - name: levels
    sub: {broker: local, topic: "in/+/data", qos: 1}
    model: level
    pub: {broker: local, topic: "out/{1}", qos: 0}
    timeout: 2s
control: {listen: CONTROL, token: "TOKEN"}
""".replace("TOKEN", TOKEN)


def call(up, method: str, path: str, token: str | None = TOKEN) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://{up.control}{path}", method=method,
                                 headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, orjson.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, orjson.loads(e.read())


def wait_state(up, state: str, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code, doc = call(up, "GET", "/rules/levels/record")
        if code == 200 and doc["state"] == state:
            return doc
        time.sleep(0.1)
    raise AssertionError(f"recording not {state} after {timeout}s: {doc}")


def replay(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", "replay", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.timeout(120)
def test_record_5000_from_a_stack_then_replay_counts_exactly_the_changed_messages(broker, probe_factory,
                                                                                stack_factory, tmp_path):
    up = stack_factory(STACK.replace("BROKER", broker.url))
    out = tmp_path / "capture.mpk"
    rec = subprocess.Popen([sys.executable, "-m", "pipeline", "record", "-c", str(up.config), "--rule", "levels",
                            "-n", "5000", "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    wait_state(up, "recording")
    probe = probe_factory("out/#")
    values = [(i * 37) % 101 for i in range(5000)]  # 0..100, each value about 50 times
    for i, v in enumerate(values):
        probe.publish(f"in/d{i % 9}/data", {"device": f"d{i % 9}", "value": v})
    stdout, stderr = rec.communicate(timeout=60)
    assert rec.returncode == 0, stderr
    assert "recorded 5000 message(s)" in stdout
    head, records = capture.read_all(out)
    assert (head["rule"], head["model"], head["source"]) == ("levels", "level", "tap")
    assert len(records) == 5000 and [orjson.loads(r.payload)["value"] for r in records] == values
    above = sum(v > 80 for v in values)  # level_v2 adds "level" there, and only there
    done = replay(str(out), "--model", "level2", "--against", "level", "-c", str(up.config), "--json")
    assert done.returncode == 1, done.stderr
    report = orjson.loads(done.stdout)
    assert report["diff"]["messages"] == above and report["diff"]["by_field"] == {"level": above}
    assert sum(report["diff"]["by_key"].values()) == above and len(report["diff"]["by_key"]) == 9
    for side in report["sides"].values():
        assert side["published"] == 5000 and side["errors"] == {} and side["latency_ms"]["p50"] is not None
    assert replay(str(out), "--model", "level2", "--against", "level", "-c", str(up.config),
                  "--max-diff", str(above)).returncode == 0
    assert replay(str(out), "--model", "level2", "--against", "level", "-c", str(up.config),
                  "--max-diff", str(above - 1)).returncode == 1
    percent = 100 * above / 5000
    assert replay(str(out), "--model", "level2", "--against", "level", "-c", str(up.config),
                  "--max-diff", f"{percent + 0.1:.2f}%").returncode == 0
    assert replay(str(out), "--model", "level2", "--against", "level", "-c", str(up.config),
                  "--max-diff", f"{percent - 0.1:.2f}%").returncode == 1


def test_a_deterministic_model_replayed_twice_is_identical(tmp_path):
    out = tmp_path / "c.mpk"
    write(out, [capture.Record(f"in/d{i % 3}/data", orjson.dumps({"device": "x", "value": i % 100}), 1e9 + i, i % 2)
                for i in range(500)])
    model = str(HERE / "models" / "level_v1")
    done = replay(str(out), "--model", model, "--against", model, "--json")
    assert done.returncode == 0, done.stderr
    report = orjson.loads(done.stdout)
    assert report["diff"]["messages"] == 0 and report["passed"]
    assert report["sides"]["new"]["sha256"] == report["sides"]["current"]["sha256"]
    assert report["sides"]["new"]["published"] == 500


def test_replay_times_out_like_a_worker(tmp_path):
    """A call over the rule's timeout stops the worker process: a QoS 0 message gets its timeout record, a QoS 1 one
    is tried again up to max_attempts, then is a dead letter; the others come out."""
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"""
brokers: {{local: {{url: "mqtt://127.0.0.1:1"}}}}
models: {{level2: {{path: {HERE / "models" / "level_v2"}}}}}
rules:
  - {{name: levels, sub: {{broker: local, topic: "in/+/data"}}, model: level2, pub: {{broker: local, topic: "out"}},
     timeout: 300ms, max_attempts: 2}}
""")
    out = tmp_path / "c.mpk"
    values_qos = [(1, 1), (-1, 0), (-1, 1), (2, 1)]  # -1 hangs level_v2
    write(out, [capture.Record(f"in/{i}/data", orjson.dumps({"value": v}), float(i), q)
                for i, (v, q) in enumerate(values_qos)])
    done = replay(str(out), "--model", "level2", "-c", str(cfg), "--json")
    assert done.returncode == 0, done.stderr
    side = orjson.loads(done.stdout)["sides"]["new"]
    assert side["published"] == 2 and side["errors"] == {"timeout": 2} and side["restarts"] == 3


@pytest.mark.timeout(60)
def test_tap_stops_at_its_count_and_bytes_and_needs_the_token(broker, probe_factory, stack_factory):
    up = stack_factory(STACK.replace("BROKER", broker.url))
    assert call(up, "POST", "/rules/levels/record?count=10", token=None)[0] == 403
    assert call(up, "POST", "/rules/levels/record?count=10", token="wrong-token-0123456789")[0] == 403
    assert call(up, "DELETE", "/rules/levels/record", token=None)[0] == 403
    assert call(up, "POST", "/rules/nope/record")[0] == 404
    assert call(up, "POST", "/rules/levels/record?count=0")[0] == 400
    code, doc = call(up, "POST", "/rules/levels/record?count=10")
    assert code == 200 and doc["state"] == "recording", doc
    assert call(up, "POST", "/rules/levels/record")[0] == 409
    probe = probe_factory()
    for i in range(50):
        probe.publish("in/d1/data", {"value": i})
    doc = wait_state(up, "done")
    assert (doc["reason"], doc["kept"], doc["missed"]) == ("count", 10, 0)
    assert [orjson.loads(r.payload)["value"] for r in capture.read_all(Path(doc["path"]))[1]] == list(range(10))
    code, doc = call(up, "POST", "/rules/levels/record?bytes=2000")
    assert code == 200, doc
    for i in range(100):
        probe.publish("in/d1/data", {"value": i, "pad": "x" * 50})
    doc = wait_state(up, "done")
    assert doc["reason"] == "bytes" and 0 < doc["kept"] < 100 and Path(doc["path"]).stat().st_size <= 2000
    assert len(capture.read_all(Path(doc["path"]))[1]) == doc["kept"]
    code, doc = call(up, "POST", "/rules/levels/record?seconds=60")
    assert code == 200
    probe.publish("in/d1/data", {"value": 1}).wait_for_publish(5)
    time.sleep(0.5)
    code, doc = call(up, "DELETE", "/rules/levels/record")
    assert code == 200 and doc["state"] == "done" and doc["reason"] == "stopped" and doc["kept"] == 1


@pytest.mark.timeout(60)
def test_record_from_the_broker(broker, probe_factory, tmp_path):
    cfg = tmp_path / "p.yaml"
    cfg.write_text(STACK.replace("BROKER", broker.url).replace("MODELS", str(HERE / "models"))
                   .replace("CONTROL", "127.0.0.1:1"))
    out = tmp_path / "b.mpk"
    rec = subprocess.Popen([sys.executable, "-m", "pipeline", "record", "-c", str(cfg), "--rule", "levels",
                            "--from-broker", "-n", "20", "--duration", "30s", "--out", str(out)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    probe = probe_factory()
    got: list[bytes] = []
    deadline = time.monotonic() + 20
    while rec.poll() is None and time.monotonic() < deadline:  # until its subscription is made, some are lost
        probe.publish("in/d1/data", {"value": len(got)}, qos=1).wait_for_publish(5)
        probe.publish("elsewhere/x", {"value": -5})
        got.append(b"")
        time.sleep(0.05)
    assert rec.wait(10) == 0, rec.communicate()[1]
    head, records = capture.read_all(out)
    assert head["source"] == "broker" and head["sub"] == "in/+/data" and len(records) == 20
    assert all(r.topic == "in/d1/data" and r.qos == 1 for r in records)
    values = [orjson.loads(r.payload)["value"] for r in records]
    assert values == list(range(values[0], values[0] + 20))


def write(path: Path, records: list[capture.Record], head: dict | None = None) -> None:
    w = capture.Writer(path, head or capture.header("levels", "level", "tap", "in/+/data"))
    for r in records:
        w.write(capture.pack(r))
    w.finish()


def hostile(tmp_path: Path, name: str, data: bytes) -> subprocess.CompletedProcess[str]:
    path = tmp_path / name
    path.write_bytes(data)
    return cli("replay", str(path), "--model", str(HERE / "models" / "level_v1"))


def test_hostile_capture_files_are_refused_naming_file_and_offset(tmp_path):
    good = tmp_path / "good.mpk"
    write(good, [capture.Record("in/a/data", b'{"value": 1}', 1.0, 1)] * 3)
    data = good.read_bytes()
    head = msgpack.packb(capture.header("levels", "level", "tap", "#"))
    record = capture.pack(capture.Record("in/a/data", b'{"value": 1}', 1.0, 1))
    cases = {
        "truncated": (data[:-3], f"truncated: the record at offset {len(data) - len(record)}"),
        "garbage": (b"\xc1" * 40, "not a capture file (offset 0"),
        "empty": (b"", "not a capture file (offset 0"),
        "version": (msgpack.packb({**capture.header("levels", "level", "tap", "#"), "version": 99}),
                    "capture format version 99 at offset 0"),
        "shape": (head + msgpack.packb(["t", "not bytes", 1.0, 1]), f"not a capture record at offset {len(head)}"),
        "qos": (head + msgpack.packb(["t", b"{}", 1.0, 7]), f"not a capture record at offset {len(head)}"),
        "declared": (head + b"\xc6\xff\xff\xff\xf0", f"at offset {len(head)}"),
        "oversized": (head + msgpack.packb(["t", b"x" * (capture.MAX_RECORD + 10), 1.0, 1]),
                      f"the record at offset {len(head)} is over {capture.MAX_RECORD} bytes"),
        "after": (data + b"\xc1", f"not a capture record at offset {len(data)}"),
        "name": (msgpack.packb(capture.header("../../etc", "level", "tap", "#")), "has no 'rule' name"),
        "time": (head + msgpack.packb(["t", b"{}", float("inf"), 1]), f"not a capture record at offset {len(head)}"),
    }
    for name, (content, expected) in cases.items():
        done = hostile(tmp_path, name, content)
        assert done.returncode == 2, (name, done.stdout, done.stderr)
        assert "Traceback" not in done.stderr and str(tmp_path / name) in done.stderr, (name, done.stderr)
        assert expected in done.stderr, (name, done.stderr)
    missing = cli("replay", str(tmp_path / "nothing.mpk"), "--model", str(HERE / "models" / "level_v1"))
    assert missing.returncode == 2 and "cannot read it" in missing.stderr


def test_the_tap_keeps_what_fits_and_counts_the_rest(tmp_path):
    """The ingress thread never waits for the tap's writer: past MAX_PENDING unwritten messages (or bytes) a message
    is not kept and is counted as missed; so is one over a record's size. Then the writer catches up."""
    request = taps.Request("levels", count=10**6)
    tap = tap_mod.Tap(request, capture.Writer(tmp_path / "t.mpk", capture.header("levels", "level", "tap", "#")))
    for i in range(tap_mod.MAX_PENDING + 5):
        tap.keep("in/d/data", b"%d" % i, 1, 1.0)
    tap.keep("in/d/data", b"x" * capture.MAX_RECORD, 1, 1.0)
    assert (tap.kept, tap.missed) == (tap_mod.MAX_PENDING, 6)
    assert tap.write() == "" and tap.written == tap_mod.MAX_PENDING
    tap.keep("in/d/data", b"after", 1, 2.0)
    tap.write()
    tap.writer.finish()
    records = capture.read_all(tmp_path / "t.mpk")[1]
    assert len(records) == tap_mod.MAX_PENDING + 1 and records[-1].payload == b"after"



def test_hostile_tap_files_never_stop_ingress_s_tap(tmp_path):
    """A request or status file in the run directory that control did not write (an infinite bound, nesting too deep
    for json, an id that is a path) is ignored or ended with its reason: ingress starts, and its tap thread goes on
    recording what is asked next."""
    folder = tmp_path / "taps"
    folder.mkdir()
    request, status = folder / "levels.json", folder / "levels.status.json"
    deep = b"[" * 100_000 + b"]" * 100_000
    request.write_text('{"id": "a1", "count": 1e999, "bytes": 100, "seconds": 5}')  # int(inf): OverflowError
    status.write_bytes(deep)
    assert taps.asked(tmp_path, "levels") is None and taps.status(tmp_path, "levels") is None
    request.write_bytes(deep)
    assert taps.asked(tmp_path, "levels") is None
    tapping = tap_mod.Taps(tmp_path, [("levels", "level", "in/+/data")]).start()  # clears leftovers: raised before
    try:
        request.write_text('{"id": "../../x", "count": 5, "bytes": 100000, "seconds": 5}')
        deadline = time.monotonic() + 5
        while request.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        ended = taps.status(tmp_path, "levels")
        assert not request.exists() and ended.state == "done" and "id must be" in ended.reason, ended
        assert not list(tmp_path.glob("*.mpk")) and tapping.thread.is_alive()
        taps.ask(tmp_path, taps.Request("levels", id="b2", count=1))
        while not tapping.on and time.monotonic() < deadline:
            time.sleep(0.05)
        tapping.keep((0,), "in/d/data", b"1", 1, 1.0)
        while taps.status(tmp_path, "levels").state != "done" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert taps.status(tmp_path, "levels").reason == "count"
    finally:
        tapping.close()


def test_ingress_starts_when_it_cannot_say_an_earlier_recording_ended(tmp_path):
    """A recording an earlier ingress left whose status cannot be written (a full disk; here a folder in the way):
    logged, its request removed, and ingress's tap starts."""
    (tmp_path / "taps" / "levels.status.json").mkdir(parents=True)
    taps.ask(tmp_path, taps.Request("levels", id="c3"))
    tapping = tap_mod.Taps(tmp_path, [("levels", "level", "in/+/data")]).start()
    try:
        time.sleep(3 * tap_mod.POLL_EVERY)
        assert taps.asked(tmp_path, "levels") is None and not tapping.on and tapping.thread.is_alive()
    finally:
        tapping.close()

def test_a_shadow_s_or_canary_s_companion_rule_is_not_recorded(tmp_path):
    """A companion gets its messages from its rule, never from MQTT: ingress's tap never sees them, so a recording
    of one would keep nothing until its seconds ran out (and its header's '~' name is refused by replay)."""
    import falcon.testing

    from pipeline.config import load as config
    from pipeline.control.app import create_app

    cfg_file = tmp_path / "p.yaml"
    cfg_file.write_text(STACK.replace("BROKER", "mqtt://127.0.0.1:1").replace("MODELS", str(HERE / "models"))
                        .replace("CONTROL", "127.0.0.1:5888").replace("timeout: 2s", "shadow: {model: level2}"))
    client = falcon.testing.TestClient(create_app(config.load(cfg_file), lambda: [], tmp_path),
                                       headers={"Host": "localhost", "Authorization": f"Bearer {TOKEN}"})
    assert client.simulate_post("/rules/levels~shadow/record").status_code == 404
    assert not (tmp_path / "taps").exists()
    done = cli("record", "-c", str(cfg_file), "--rule", "levels~shadow", "--out", str(tmp_path / "x.mpk"))
    assert done.returncode == 2 and "is the shadow of rule 'levels'" in done.stderr, done.stderr

def test_a_keyed_rule_is_replayed_with_each_keys_state(tmp_path):
    """Each message of a key starts from the state the previous one of that key left, as in the stack; a message
    without a key value gets its no_key record."""
    from pipeline.config import load as config
    from pipeline.rollout import replay as replay_mod

    cfg_file = tmp_path / "p.yaml"
    cfg_file.write_text(f"""
brokers: {{local: {{url: "mqtt://127.0.0.1:1"}}}}
models: {{count: {{path: {HERE / "models" / "keyed_count"}}}}}
rules:
  - {{name: counted, sub: {{broker: local, topic: "in/+/data"}}, model: count, pub: {{broker: local, topic: out}},
     key: device}}
""")
    rule = config.load(cfg_file).rule("counted")
    records = [capture.Record("in/x/data", orjson.dumps({"device": f"d{i % 3}"}), float(i), 1) for i in range(30)]
    records.append(capture.Record("in/x/data", b"{}", 31.0, 1))
    version = replay_mod.Version("count", HERE / "models" / "keyed_count", {}, "count")
    out = replay_mod.Player(rule, version, None).play(records)
    got = [orjson.loads(r.payload) for r in out.results]
    assert got[:30] == [{"key": f"d{i % 3}", "n": i // 3 + 1} for i in range(30)]
    assert got[30]["reason"] == "no_key"
