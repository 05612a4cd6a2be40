"""Pure units: topic filters and templates, the JSON codec, ZMQ envelopes, the supervisord rendering."""

from __future__ import annotations

import base64
import configparser
import decimal
import math
import re
import sqlite3
import typing
from pathlib import Path

import msgpack
import numpy as np
import orjson
import pytest

from pipeline import topics
from pipeline.config import load as config
from pipeline.errors import DecodeError
from pipeline.models import codec
from pipeline.supervision import programs as stack
from pipeline.wire import frames as envelope

MODELS = Path(__file__).parent / "models"

# ---------------------------------------------------------------------------------------------- topics


@pytest.mark.parametrize("topic", ["a", "a/b/c", "#", "+", "a/+/b", "a/#", "+/+/#", "/a", "a//b", "$SYS/#"])
def test_check_filter_accepts(topic):
    assert topics.check_filter(topic) == topic


@pytest.mark.parametrize("topic, why", [
    ("", "empty"), ("a/\x00", "NUL"), ("a/#/b", "'#' must be a whole level and the last one"),
    ("a#", "'#' must be"), ("a/b#", "'#' must be"), ("#/", "'#' must be"),
    ("a/b+/c", "'+' must be a whole level"), ("+a", "'+' must be"), ("a/++", "'+' must be"),
])
def test_check_filter_rejects(topic, why):
    with pytest.raises(ValueError, match=re.escape(why)):
        topics.check_filter(topic)


@pytest.mark.parametrize("flt, topic, expected", [
    ("a/b", "a/b", True), ("a/b", "a/c", False), ("a/b", "a/b/c", False), ("a/b/c", "a/b", False),
    ("a/+/c", "a/x/c", True), ("a/+/c", "a/x/y/c", False), ("a/+", "a", False), ("+", "a", True),
    ("a/+", "a/", True), ("#", "a/b/c", True), ("a/#", "a/b/c", True), ("a/#", "a", True),
    ("a/#", "ab", False), ("a/#", "b/a", False), ("+/+", "a/b", True), ("+/#", "a", True),
    ("#", "$SYS/broker/load", False), ("+/broker/load", "$SYS/broker/load", False),
    ("+/#", "$SYS/x", False), ("$SYS/#", "$SYS/broker/load", True), ("$SYS/+/load", "$SYS/broker/load", True),
])
def test_matches(flt, topic, expected):
    assert topics.matches(flt, topic) is expected


@pytest.mark.parametrize("template, topic, expected", [
    ("plant/{1}/alarm", "plant/d7/telemetry", "plant/d7/alarm"),
    ("{2}-{0}/{1}{1}", "a/b/c", "c-a/bb"),
    ("fixed/out", "anything/at/all", "fixed/out"),
    ("x/{0}", "", "x/"),
])
def test_template_rendering(template, topic, expected):
    assert topics.compile_template(template)(topic) == expected


@pytest.mark.parametrize("template, flt", [("out/{1}", "a/+"), ("{0}/{1}", "a/+/#"), ("o/{1}", "a/+/#")])
def test_check_template_accepts(template, flt):
    assert topics.check_template(template, flt) == template


@pytest.mark.parametrize("template, flt, why", [
    ("", "a", "topic is empty"),
    ("out/+", "a", "wildcards"), ("out/#", "a", "wildcards"),
    ("out/{2}", "a/+", "{2} refers to level 2 of the input topic, but filter 'a/+' has fixed levels 0..1"),
    ("out/{1}", "a/#", "{1} refers to level 1"),
    ("out/{x}", "a", "braces are only allowed"), ("out/{", "a", "braces"), ("out/}", "a", "braces"),
])
def test_check_template_rejects(template, flt, why):
    with pytest.raises(ValueError, match=re.escape(why)):
        topics.check_template(template, flt)


# ----------------------------------------------------------------------------------------------- codec


@pytest.mark.parametrize("payload, expected", [
    (b'{"value": 31.5, "deviceName": "d1"}', {"value": 31.5, "deviceName": "d1"}),
    (b"[1, 2]", [1, 2]), (b"42", 42), (b"null", None), ('"température"'.encode(), "température"),
])
def test_decode_event_json(payload, expected):
    assert codec.decode_event(payload) == expected


@pytest.mark.parametrize("payload, why", [
    (b"{not json", "payload is not JSON"), (b"", "payload is not JSON"), (b"text", "payload is not JSON"),
    (b"\xff\xfe{}", "payload is not UTF-8: .* at byte 0"), (b'{"a": "\xe9"}', "not UTF-8: .* at byte 7"),
    (b"[" * 10_000, "payload is not JSON"), (b"[" * 10_000 + b"]" * 10_000, "payload is not JSON"),
])
def test_decode_event_bad(payload, why):
    with pytest.raises(codec.BadPayload, match=why):
        codec.decode_event(payload)


@pytest.mark.parametrize("value, expected", [
    ({"a": 1, "b": [True, None]}, b'{"a":1,"b":[true,null]}'),
    ({1: "x"}, b'{"1":"x"}'),
    ("température", '"température"'.encode()),  # UTF-8, not \u00e9
    ({"nan": math.nan, "inf": math.inf, "ninf": -math.inf}, b'{"nan":null,"inf":null,"ninf":null}'),
    (b"\x00raw\xff", b"\x00raw\xff"), (bytearray(b"\x01"), b"\x01"), (memoryview(b"mv"), b"mv"),
    ((1, 2), b"[1,2]"), ({7}, b"[7]"), (frozenset(["z"]), b'["z"]'), (decimal.Decimal("1.5"), b"1.5"),
    (np.float32(1.5), b"1.5"), (np.int64(-3), b"-3"), (np.bool_(True), b"true"), (np.float64("nan"), b"null"),
    (np.array([[1, 2], [3, 4]]), b"[[1,2],[3,4]]"), (np.arange(6)[::2], b"[0,2,4]"),
    (np.array([1.5, np.inf]), b"[1.5,null]"), (np.array(["a", "é"]), '["a","é"]'.encode()),
    ({"v": np.float64(2.25), "xs": np.arange(3, dtype=np.uint8)}, b'{"v":2.25,"xs":[0,1,2]}'),
])
def test_encode_value(value, expected):
    out = codec.encode_value(value)
    assert out == expected and isinstance(out, bytes)


@pytest.mark.parametrize("value, type_name", [
    (object(), "object"), ({"o": object()}, "dict"), ({object()}, "set"),
    (np.array([object()], dtype=object), "ndarray"), (1 << 70, "int"),
])
def test_encode_value_unserialisable(value, type_name):
    with pytest.raises(codec.Unserialisable, match=f"result of type {type_name} cannot be published"):
        codec.encode_value(value)


def _record(payload: bytes, error: BaseException | str = "boom") -> dict:
    return orjson.loads(codec.error_record(rule="r1", topic="in/d1/data", reason="model_error", error=error,
                                           message_id="boot-7", payload=payload, attempt=2))


def test_error_record_fields():
    assert _record('{"t": "é"}'.encode(), ValueError("boom")) == {
        "rule": "r1", "topic": "in/d1/data", "reason": "model_error", "error": "ValueError: boom",
        "message_id": "boot-7", "attempt": 2, "payload": '{"t": "é"}', "payload_encoding": "utf-8",
        "payload_truncated": False,
    }
    assert _record(b"x", "timeout after 2s")["error"] == "timeout after 2s"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize("payload, text, encoding, truncated", [
    (b"\x00\xff\xfe", b64(b"\x00\xff\xfe"), "base64", False),
    (b"a" * 65536, "a" * 65536, "utf-8", False),
    (b"a" * 65546, "a" * 65536, "utf-8", True),
    (b"\xff" * 70_000, b64(b"\xff" * 65536), "base64", True),
], ids=["binary", "64k", "64k+10", "binary-70k"])
def test_error_record_payload(payload, text, encoding, truncated):
    rec = _record(payload)
    assert (rec["payload"], rec["payload_encoding"], rec["payload_truncated"]) == (text, encoding, truncated)


def test_error_record_truncated_text_stays_utf8():
    rec = _record(("€" * 30_000).encode())  # 90,000 bytes; 65536 is not a multiple of 3
    assert rec["payload_truncated"] is True and rec["payload_encoding"] == "utf-8"


def test_error_record_caps_the_error_text_and_marks_a_base64_topic():
    rec = orjson.loads(codec.error_record(rule="r", topic=b64(b"h/\xff"), reason="bad_topic", error="e" * 100_000,
                                          message_id="b-1", payload=b"{}", topic_encoding="base64"))
    assert rec["error"] == "e" * codec.MAX_ERROR_TEXT + f"... ({100_000 - codec.MAX_ERROR_TEXT} more characters)"
    assert rec["topic_encoding"] == "base64" and "topic_encoding" not in _record(b"{}")


@pytest.mark.parametrize("payload", [b"a" * 70_000, "€".encode() * 30_000, b"\xff" * 70_000])
def test_an_error_record_is_cut_to_fit_a_packet_limit(payload):
    record = codec.error_record(rule="r", topic="in/x", reason="model_error", error="boom", message_id="b-1",
                                payload=payload)
    small = codec.shrink_record(record, 4000)
    rec = orjson.loads(small)
    assert len(small) <= 4000 and rec["payload_truncated"] is True and rec["error"] == "boom"
    if rec["payload_encoding"] == "base64":
        assert base64.b64decode(rec["payload"]) == payload[:len(base64.b64decode(rec["payload"]))]
    assert codec.shrink_record(record, 100) is None and codec.shrink_record(b"not json", 4000) is None


@pytest.mark.parametrize("topic, problem", [
    ("out/a", None), ("é/ünïcode", None), ("t" * 65_535, None),
    ("", "the topic is empty"), ("a/+/b", "holds a wildcard"), ("a/#", "holds a wildcard"),
    ("a\x00b", "control character"), ("a\x1fb", "control character"), ("a\x85", "control character"),
    ("a\ufdd0", "non-character"), ("a\U0010ffff", "non-character"), ("a\ufffe", "non-character"),
    ("t" * 65_536, "over 65535 bytes"), ("é" * 40_000, "over 65535 bytes"), ("a\udcff", "lone surrogate"),
    (b"out", "not a string (bytes)"), (None, "not a string (NoneType)"),
])
def test_publish_problem(topic, problem):
    got = topics.publish_problem(topic)
    assert got is None if problem is None else problem in got


@pytest.mark.parametrize("field, value, problem", [
    ("payload", "text", "payload must be bytes"), ("kind", 7, "kind must be"), ("kind", True, "kind must be"),
    ("source_mid", 70_000, "source_mid 0 to 65535"), ("source_qos", 2, "source_qos must be 0 or 1"),
    ("rule", 5, "must be strings"), ("message_id", "é", "ASCII"), ("received_at", "now", "must be unix time"),
    ("received_at", float("nan"), "must be unix time"), ("received_at", 2**63, "must be unix time"),
    ("latency", float("inf"), "must be unix time and seconds"), ("latency", -1.0, "must be unix time"),
])
def test_result_problem(field, value, problem):
    good = envelope.Result("b-1", "r", envelope.PUBLISH, "out", b"{}", "local", 1, 1, 1.0, 0.0)
    assert envelope.result_problem(good) is None
    assert problem in envelope.result_problem(good._replace(**{field: value}))


# -------------------------------------------------------------------------------------------- envelope

def _env(cls: type, i: int, **given: object) -> tuple:
    """An envelope of `cls` built by field name (robust to added fields), values varying with `i`."""
    sample = {str: lambda f: f"{f}-{i}-é", bytes: lambda f: b"\x00" + bytes([i]) + b"\xff",
              int: lambda f: i, float: lambda f: 1700000000.25 + i, bool: lambda f: bool(i % 2),
              str | None: lambda f: f"{f}-{i}" if i else None, bytes | None: lambda f: bytes([i]) if i else None}
    return cls(**{f: given.get(f, sample[t](f)) for f, t in typing.get_type_hints(cls).items()})


MESSAGES = [_env(envelope.Message, i) for i in range(3)]
RESULTS = [_env(envelope.Result, i, kind=k) for i, k in
           enumerate((envelope.PUBLISH, envelope.ERROR, envelope.NOTHING))]


@pytest.mark.parametrize("kind, items", [(envelope.Message, MESSAGES), (envelope.Result, RESULTS),
                                         (envelope.Message, [])])
def test_envelope_round_trip(kind, items):
    out = envelope.decode(envelope.encode(items), kind)
    assert out == items and all(type(x) is kind for x in out)
    assert all(isinstance(x.payload, bytes) for x in out)


@pytest.mark.parametrize("frame", [
    b"", b"\xc1", b"garbage bytes", msgpack.packb(5), msgpack.packb({"a": 1}), msgpack.packb([1, 5]),
    msgpack.packb([1, [["too", "short"]]]), msgpack.packb([1, []]) + b"x", b"\x91" * 100_000,
])
def test_envelope_decode_garbage(frame):
    with pytest.raises(DecodeError, match="bad Message frame"):
        envelope.decode(frame, envelope.Message)


def test_envelope_version_mismatch():
    frame = msgpack.packb([envelope.VERSION + 1, [list(RESULTS[0])]], use_bin_type=True)
    expected = f"envelope version {envelope.VERSION + 1}, expected {envelope.VERSION}"
    with pytest.raises(DecodeError, match=expected):
        envelope.decode(frame, envelope.Result)


# ------------------------------------------------------------------------------------------- stack

STACK = """
brokers:
  edge: {{url: {edge}}}
  up: {{url: "mqtt://10.1.2.3:1884"}}
models:
  p: {{path: {models}/probe}}
rules:
  - {{name: alpha, sub: {{broker: edge, topic: "a/+"}}, model: p, pub: {{broker: up, topic: "o/{{1}}"}}}}
  - {{name: beta.2, sub: {{broker: up, topic: "b/#"}}, model: p, pub: {{broker: edge, topic: o}}, workers: 3}}
"""


def _render(tmp_path: Path, edge_url: str, log_dir: Path | None = None) -> configparser.ConfigParser:
    path = tmp_path / "stack.yaml"
    path.write_text(STACK.format(edge=edge_url, models=MODELS))
    cfg = config.load(path).with_workers({"alpha": 4})
    text = stack.render(stack.programs(cfg, tmp_path / "run", "info"), tmp_path / "run", log_dir)
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(text)
    return parser


def test_stack_render_programs(tmp_path):
    conf = _render(tmp_path, "embedded")
    progs = {s.removeprefix("program:"): conf[s] for s in conf.sections() if s.startswith("program:")}
    assert set(progs) == {"broker-edge", "egress", "control", "forkserver", "ingress"}  # one program for all workers
    assert all(p["numprocs"] == "1" for p in progs.values())
    prio = {name: int(p["priority"]) for name, p in progs.items()}
    assert prio["ingress"] > max(v for k, v in prio.items() if k != "ingress")
    assert prio["broker-edge"] < prio["egress"] < prio["forkserver"]
    for p in progs.values():
        assert set(p["exitcodes"].split(",")) == {"0", "2", "3", "4"}
        assert p["autorestart"] == "unexpected" and p["stdout_logfile"] == "/dev/stdout"
    assert "--listen 127.0.0.1:1883" in progs["broker-edge"]["command"]
    assert "pipeline forkserver" in progs["forkserver"]["command"]
    assert "--workers alpha=4 --workers beta.2=3" in progs["forkserver"]["command"]
    assert "--workers alpha=4 --workers beta.2=3" in progs["ingress"]["command"]
    assert 'OMP_NUM_THREADS="1"' in progs["forkserver"]["environment"]
    assert conf["supervisord"]["nodaemon"] == "true"
    assert conf["unix_http_server"]["file"] == str(tmp_path / "run" / "supervisor.sock")


def test_a_stack_whose_rules_have_no_local_worker_keeps_its_fork_server_for_reloads(tmp_path):
    path = tmp_path / "stack.yaml"
    path.write_text(STACK.format(edge="embedded", models=MODELS))
    cfg = config.load(path).with_workers({"alpha": 0, "beta.2": 0})
    progs = {p.name: p for p in stack.programs(cfg, tmp_path / "run", "info")}
    assert "forkserver" in progs and "alpha=0" in " ".join(progs["forkserver"].args)
    assert "alpha=0" in " ".join(progs["ingress"].args)


@pytest.mark.parametrize("url, listen", [("mqtt://10.0.0.1:1883", None), ("embedded://0.0.0.0:2883", "2883")])
def test_stack_render_broker_and_log_dir(tmp_path, url, listen):
    conf = _render(tmp_path, url, log_dir=tmp_path / "logs")
    brokers = [s for s in conf.sections() if s.startswith("program:broker")]
    assert brokers == ([] if listen is None else ["program:broker-edge"])
    assert listen is None or f"--listen 0.0.0.0:{listen}" in conf["program:broker-edge"]["command"]
    logfile = f"{tmp_path / 'logs'}/%(program_name)s-%(process_num)d.log"
    assert all(conf[s]["stdout_logfile"] == logfile for s in conf.sections() if s.startswith("program:"))


# ------------------------------------------------------------------------------------------ ingress frames

@pytest.mark.parametrize("parts, problem", [
    ([b"w1", envelope.pack([envelope.CREDIT, 3])], None),
    ([b"\x00\x8b\x45\x67\x89", envelope.pack([envelope.CREDIT, 3])], "not UTF-8"),
    ([b"w" * 256, envelope.pack([envelope.CREDIT, 3])], "1 to 255 bytes"),
    ([b"w1", envelope.pack([envelope.CREDIT, 0])], "a credit must be an int from 1"),
    ([b"w1", envelope.pack([envelope.CREDIT, envelope.PREFETCH + 1])], "a credit must be an int from 1"),
    ([b"w1", envelope.pack([envelope.CREDIT, True])], "a credit must be an int"),
    ([b"w1", envelope.pack([envelope.BEAT, 3])], "expected [CREDIT, n]"),
    ([b"w1", b"\xc1"], "bad control frame"),
    ([b"w1", b"a", b"b"], "one frame behind the identity"),
])
def test_credit_frames(parts, problem):
    from pipeline.stages.ingress import feedback as frames

    if problem is None:
        assert frames.credit(parts) == (b"w1", 3)
        return
    with pytest.raises(frames.BadFrame, match=re.escape(problem)):
        frames.credit(parts)


@pytest.mark.parametrize("body, problem", [
    (["w1", 0, envelope.BEAT, 5], None),
    (["w1", 0, envelope.TIMEOUT, ["b-1", ["b-0"]]], None),
    (["w1", 0, envelope.TIMEOUT, [None, []]], None),
    (["w1", 2, envelope.BEAT, 5], "a rule index must be an int from 0 to 1"),
    (["w1", 0, envelope.BEAT, -1], "free credit must be an int"),
    (["w1", 0, 9, 5], "expected a BEAT or a TIMEOUT"),
    (["w1", 0, envelope.TIMEOUT, [1, []]], "a TIMEOUT's value must be"),
    (["w1", 0, envelope.TIMEOUT, ["b-1", [2]]], "a TIMEOUT's value must be"),
    ([b"\xff", 0, envelope.BEAT, 5], "not UTF-8"),
    (["w1", 0, envelope.BEAT], "expected [worker, rule index, kind, value]"),
])
def test_beat_frames(body, problem):
    from pipeline.stages.ingress import feedback as frames

    if problem is None:
        assert frames.beat(envelope.pack(body), 2).ident == b"w1"
        return
    with pytest.raises(frames.BadFrame, match=re.escape(problem)):
        frames.beat(envelope.pack(body), 2)


def test_confirm_frames():
    from pipeline.stages.ingress import feedback as frames

    assert frames.confirms(envelope.pack([])) is None
    assert frames.confirms(envelope.pack([["b-1", "r", "local", "w1"]])) == [frames.Confirm("b-1", "r", "local", "w1")]
    for body in (0, None, [["b-1", "r", "local"]], [["b-1", "r", "local", 5]], "x", [[]]):
        with pytest.raises(frames.BadFrame, match="expected a list of"):
            frames.confirms(envelope.pack(body))


# ------------------------------------------------------------------------------------------------ outbox

@pytest.mark.parametrize("setting, pragma", [("full", 2), ("normal", 1)])
def test_outbox_synchronous(tmp_path, setting, pragma):
    from pipeline.stages.egress.outbox import Outbox

    outbox = Outbox(tmp_path / "o.sqlite3", 1 << 20, setting)
    assert outbox.db.execute("PRAGMA synchronous").fetchone()[0] == pragma
    assert config.Outbox().synchronous == "full"  # the default keeps confirmed results through a power cut
    outbox.close()


def test_outbox_set_aside_moves_a_row_and_adds_its_record_in_one_transaction(tmp_path):
    from pipeline.stages.egress.outbox import Outbox

    outbox = Outbox(tmp_path / "o.sqlite3", 1 << 20)
    outbox.add([("b", "out/1", b"abc", 1, 0, "r", 1.0), ("b", "out/2", b"de", 1, 0, "r", 1.0)])
    first = outbox.after("b", 0, 1)[0]
    outbox.set_aside(first.id, 3, "refused", ("b", "pipeline/errors/r", b"{}", 1, 0, "r", 2.0))
    assert [r.topic for r in outbox.after("b", 0, 10)] == ["out/2", "pipeline/errors/r"]
    assert (outbox.rows, outbox.bytes, outbox.set_aside_rows) == (2, 4, 1)
    assert outbox.db.execute("SELECT topic, reason FROM set_aside").fetchall() == [("out/1", "refused")]
    with pytest.raises(sqlite3.IntegrityError):  # a failed write leaves no transaction open
        outbox.add([("b", None, b"x", 1, 0, "r", 1.0)])
    assert not outbox.db.in_transaction and outbox.rows == 2
    outbox.close()
