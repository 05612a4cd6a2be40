"""The YAML configuration: the example, ${VAR} expansion, every kind of bad file, and `pipeline check`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import load as config
from pipeline.errors import ConfigError

ROOT = Path(__file__).parent.parent
EXAMPLE = ROOT / "conf" / "example.yaml"
EXAMPLE_ENV = ("PIPELINE_BROKER_URL", "MQTT_USER", "MQTT_PASSWORD")
SECRET = "pw-Zq8-never-print-me"

BASE = """\
brokers:
  local: {url: "mqtt://127.0.0.1:1883"}
models:
  m: {path: model}
rules:
  - name: r1
    sub: {broker: local, topic: "a/+/b", qos: 1}
    model: m
    pub: {broker: local, topic: "out/{1}", qos: 1}
    workers: 1
    timeout: 10s
"""


@pytest.fixture
def write(tmp_path):
    """write(text) -> path of a config file in tmp_path, next to a minimal model folder `model/`."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "index.py").write_text("def handler(event, context):\n    return event\n")

    def make(text: str) -> Path:
        (tmp_path / "pipeline.yaml").write_text(text)
        return tmp_path / "pipeline.yaml"

    return make


def check(path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in EXAMPLE_ENV}
    return subprocess.run([sys.executable, "-m", "pipeline", "check", "-c", str(path)], capture_output=True,
                          text=True, env={**clean, **env}, timeout=60)


# ------------------------------------------------------------------------------------------ the example


@pytest.mark.parametrize("env, broker", [
    ({}, ("embedded://127.0.0.1:1883", "embedded", "127.0.0.1", 1883, "", "")),
    ({"PIPELINE_BROKER_URL": "mqtt://10.0.0.7:1884", "MQTT_USER": "alice", "MQTT_PASSWORD": SECRET},
     ("mqtt://10.0.0.7:1884", "mqtt", "10.0.0.7", 1884, "alice", SECRET)),
], ids=["env-unset", "env-set"])
def test_example_loads(monkeypatch, tmp_path, env, broker):
    for var in EXAMPLE_ENV:
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    monkeypatch.chdir(tmp_path)  # model paths are relative to the file, not to the working directory
    cfg = config.load(EXAMPLE)
    assert cfg.source == EXAMPLE.resolve() and list(cfg.brokers) == ["local"]
    b = cfg.brokers["local"]
    assert (b.url, b.scheme, b.host, b.port, b.username, b.password.get_secret_value()) == broker
    assert SECRET not in repr(b) + str(b.model_dump())
    assert {n: (m.path, m.params) for n, m in cfg.models.items()} == {
        "threshold": (ROOT / "models" / "threshold", {"limit": 30}),
        "calibrated": (ROOT / "models" / "calibrated", {}),
    }
    alarm, calib = cfg.rules
    assert (alarm.name, alarm.model, alarm.workers, alarm.timeout) == \
        ("temperature-alarm", "threshold", 2, 10.0)
    assert (alarm.sub.broker, alarm.sub.topic, alarm.sub.qos) == ("local", "plant/+/telemetry", 1)
    assert (alarm.pub.broker, alarm.pub.topic, alarm.pub.qos, alarm.pub.retain) == \
        ("local", "plant/{1}/alarm", 1, False)
    assert alarm.error_topic == "pipeline/errors/temperature-alarm"
    assert (calib.name, calib.model, calib.workers, calib.timeout) == ("calibration", "calibrated", 1, 10.0)
    assert calib.pub.topic == "plant/{1}/calibrated" and cfg.control.listen == "127.0.0.1:5888"


@pytest.mark.parametrize("url, expected", [
    ("embedded", ("embedded", "127.0.0.1", 1883, True)),
    ("embedded://0.0.0.0:2883", ("embedded", "0.0.0.0", 2883, True)),
    ("tcp://broker.lan", ("mqtt", "broker.lan", 1883, False)),
    ("mqtts://broker.lan", ("mqtts", "broker.lan", 8883, False)),
])
def test_broker_urls(write, url, expected):
    b = config.load(write(BASE.replace('"mqtt://127.0.0.1:1883"', url))).brokers["local"]
    assert (b.scheme, b.host, b.port, b.embedded) == expected


@pytest.mark.parametrize("value, seconds", [("10s", 10.0), ("250ms", 0.25), ("2m", 120.0), ("1h", 3600.0),
                                            ("1.5", 1.5), ("' 3 s '", 3.0), ("7", 7.0)])
def test_durations(write, value, seconds):
    assert config.load(write(BASE.replace("timeout: 10s", f"timeout: {value}"))).rules[0].timeout == seconds


def test_with_workers_and_rule_lookup():
    cfg = config.load(EXAMPLE)
    more = cfg.with_workers({"calibration": 5})
    assert [r.workers for r in more.rules] == [2, 5] and [r.workers for r in cfg.rules] == [2, 1]
    assert more.rule("calibration").workers == 5 and more.rule_index("calibration") == 1
    assert more.rules[0] is cfg.rules[0] and more.models == cfg.models
    with pytest.raises(KeyError) as e:
        cfg.rule("nope")
    assert e.value.args[0] == \
        f"no rule named 'nope' in {EXAMPLE.resolve()} (rules: temperature-alarm, calibration)"


# ------------------------------------------------------------------------------------------ ${VAR}

ENV_CONFIG = """\
brokers:
  local: {url: "${PT_URL}", username: "${PT_USER:-guest}", password: "${PT_PW:-}"}
models:
  m: {path: "${PT_MODELS:-.}/model"}
rules:
  - name: ${PT_RULE:-r1}
    sub: {broker: local, topic: "${PT_SITE:-plant}/+/${PT_KIND}"}
    model: m
    pub: {broker: local, topic: "out/{1}/${PT_KIND}-${PT_KIND}"}
    workers: ${PT_WORKERS:-3}
    timeout: "${PT_TIMEOUT:-250}ms"
"""
ENV_NAMES = [f"PT_{n}" for n in ("URL", "USER", "PW", "MODELS", "RULE", "SITE", "KIND", "WORKERS", "TIMEOUT")]


@pytest.mark.parametrize("env, expected", [
    ({"PT_URL": "mqtt://b.lan:1884", "PT_KIND": "raw"},
     ("mqtt://b.lan:1884", "guest", "", "r1", "plant/+/raw", "out/{1}/raw-raw", 3, 0.25)),
    ({"PT_URL": "embedded", "PT_USER": "bob", "PT_PW": SECRET, "PT_MODELS": "TMP", "PT_RULE": "from-env",
      "PT_SITE": "mill", "PT_KIND": "k", "PT_WORKERS": "5", "PT_TIMEOUT": "1500"},
     ("embedded://127.0.0.1:1883", "bob", SECRET, "from-env", "mill/+/k", "out/{1}/k-k", 5, 1.5)),
], ids=["defaults", "all-set"])
def test_env_expansion(write, monkeypatch, tmp_path, env, expected):
    for var in ENV_NAMES:
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value.replace("TMP", str(tmp_path)))
    cfg = config.load(write(ENV_CONFIG))
    b, r = cfg.brokers["local"], cfg.rules[0]
    assert cfg.models["m"].path == tmp_path / "model"
    assert (b.url, b.username, b.password.get_secret_value(), r.name, r.sub.topic, r.pub.topic, r.workers,
            r.timeout) == expected


def test_env_unset_without_default_is_an_error(write, monkeypatch):
    for var in ENV_NAMES:
        monkeypatch.delenv(var, raising=False)
    path = write(ENV_CONFIG)
    with pytest.raises(ConfigError) as e:
        config.load(path)
    problems = e.value.problems
    assert e.value.path == str(path) and str(e.value).startswith(f"{path}: 4 problem(s)\n")
    assert problems[0] == \
        "brokers.local.url: environment variable PT_URL is not set (write ${PT_URL:-default})"
    assert problems[1].startswith("rules[0].sub.topic: environment variable PT_KIND is not set")
    assert all(p.startswith("rules[0].pub.topic: environment variable PT_KIND") for p in problems[2:])


# ------------------------------------------------------------------------------------------ bad files

URL = '"mqtt://127.0.0.1:1883"'
SECOND = "rules:\n  - {name: r1, sub: {broker: local, topic: x}, model: m, pub: {broker: local, topic: y}}\n"
MAPPING = "expected a mapping with brokers:, models: and rules: at the top"

# (id, replace this, by this (or the whole file when None), expected: first item = start of a problem line)
BAD = [
    ("misspelled-key", "    sub:", "    sbu:",
     ["rules[0].sbu: unknown key", "rules[0].sub: required key is missing"]),
    ("unknown-top-key", "models:", "modles:", ["modles: unknown key", "models: required key is missing"]),
    ("undefined-broker", "sub: {broker: local", "sub: {broker: remote",
     ["rules[0].sub.broker: no broker named 'remote' is defined under 'brokers:' (defined: local)",
      "(got 'remote')"]),
    ("undefined-model", "    model: m\n", "    model: nope\n",
     ["rules[0].model: no model named 'nope' is defined under 'models:' (defined: m) (got 'nope')"]),
    ("hash-not-last", '"a/+/b"', '"a/#/b"',
     ["rules[0].sub.topic: '#' must be a whole level and the last one (got 'a/#/b')"]),
    ("plus-in-level", '"a/+/b"', '"a/b+/c"',
     ["rules[0].sub.topic: '+' must be a whole level (got 'a/b+/c')"]),
    ("duplicate-rule", "rules:\n", SECOND, ["rules[1].name: duplicate rule name 'r1'"]),
    ("workers-negative", "workers: 1", "workers: -1", ["rules[0].workers: ", "greater than or equal to 0 (got -1)"]),
    ("remote-without-keys", "    timeout: 10s\n", "    timeout: 10s\nendpoints: {remote: {listen: 0.0.0.0}}\n",
     ["endpoints.remote.server_key: required key is missing", "endpoints.remote.authorized_keys: required key"]),
    ("remote-ports-overlap", "    timeout: 10s\n", "    timeout: 10s\nendpoints: {transport: tcp, base_port: 5800, "
     "remote: {base_port: 5850, server_key: k, authorized_keys: a}}\n",
     ["endpoints.remote.base_port: remote.base_port must be at least 100 away from base_port"]),
    ("workers-65", "workers: 1", "workers: 65", ["rules[0].workers: ", "less than or equal to 64 (got 65)"]),
    ("bad-duration", "timeout: 10s", "timeout: 10 sec",
     ["rules[0].timeout: expected a duration such as 500ms, 10s, 2m, 1h or 7d (got '10 sec')"]),
    ("zero-duration", "timeout: 10s", "timeout: 0ms", ["rules[0].timeout: ", "greater than 0 (got '0ms')"]),
    ("placeholder-beyond", '"out/{1}"', '"out/{3}"',
     ["rules[0].pub.topic: {3} refers to level 3 of the input topic,",
      "but filter 'a/+/b' has fixed levels 0..2"]),
    ("wildcard-in-pub", '"out/{1}"', '"out/+"',
     ["rules[0].pub.topic: an output topic cannot contain the wildcards '+' or '#'"]),
    ("qos-2", 'topic: "a/+/b", qos: 1', 'topic: "a/+/b", qos: 2', ["rules[0].sub.qos: ", "0 or 1 (got 2)"]),
    ("missing-key", "    model: m\n", "", ["rules[0].model: required key is missing"]),
    ("no-rules", "rules:\n", "rules: []\nx:\n", ["rules: ", "at least 1 item", "x: unknown key"]),
    ("url-scheme", URL, '"http://h:1883"',
     ["brokers.local.url: expected mqtt://HOST[:PORT], mqtts://HOST[:PORT], embedded", "(got 'http://h:1883')"]),
    ("url-port", URL, '"mqtt://h:99999"', ["brokers.local.url: ", "(got 'mqtt://h:99999')"]),
    ("model-path", "path: model", "path: nowhere",
     ["models.m.path: no such file or folder: TMP/nowhere (got 'nowhere')"]),
    ("model-file", "path: model", "path: model/index.py",
     ["models.m.path: a model is a folder or a .zip holding index.py (or a .tar.gz or .tgz archive) "
      "(got 'model/index.py')"]),
    ("rule-name", "name: r1", "name: r 1!", ["rules[0].name: String should match pattern", "(got 'r 1!')"]),
    ("broker-name", "  local: {", "  my broker: {", ["brokers.my broker", "(got 'my broker')"]),
    ("keepalive", URL + "}", URL + ", keepalive: 1}", ["brokers.local.keepalive: ", "(got 1)"]),
    ("yaml-syntax", None, "brokers: {local: [\n", ["not valid YAML: "]),
    ("top-level-list", None, "- brokers: {}\n- rules: []\n", [MAPPING]),
    ("empty-file", None, "", [MAPPING]),
]


@pytest.mark.parametrize("old, new, expected", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_file(write, tmp_path, old, new, expected):
    text = new if old is None else BASE.replace(old, new, 1)
    assert text != BASE
    path = write(text)
    with pytest.raises(ConfigError) as e:
        config.load(path)
    expected = [x.replace("TMP", str(tmp_path)) for x in expected]
    message = str(e.value)
    assert e.value.path == str(path) and message.startswith(f"{path}: {len(e.value.problems)} problem(s)\n")
    assert any(p.startswith(expected[0]) for p in e.value.problems), e.value.problems
    assert all(x in message for x in expected), message


def test_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match="(?s)missing.yaml: 1 problem.*cannot read the file: No such file"):
        config.load(tmp_path / "missing.yaml")


def test_template_error_names_the_bad_value(write):
    with pytest.raises(ConfigError, match=r"rules\[0\]\.pub\.topic: .*'out/\+'"):
        config.load(write(BASE.replace('"out/{1}"', '"out/+"')))


# ------------------------------------------------------------------------------------------ pipeline check


def test_check_example():
    out = check(EXAMPLE)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"{EXAMPLE.resolve()}: OK")
    for text in ("temperature-alarm", "calibration", "embedded://127.0.0.1:1883 (MQTT 3.1.1: the embedded broker)",
                 "x2", "plant/{1}/alarm"):
        assert text in out.stdout


def test_check_misspelled_key(write):
    path = write(BASE.replace("    sub:", "    sbu:"))
    out = check(path)
    assert out.returncode == 2 and out.stdout == ""
    assert f"{path}: 2 problem(s)" in out.stderr and "  rules[0].sbu: unknown key" in out.stderr


@pytest.mark.parametrize("password, extra, rc, shown", [
    ('"${PT_SECRET}"', "", 0, "mqtt://127.0.0.1:1883 as bob (MQTT 5, or 3.1.1 if the broker refuses 5)"),
    ('"${PT_SECRET}"', ", keepalive: 1", 2, "brokers.local.keepalive: "),
    ('["${PT_SECRET}"]', "", 2, "brokers.local.password: "),
    ('{value: "${PT_SECRET}"}', "", 2, "brokers.local.password: "),
])
def test_check_never_prints_the_password(write, password, extra, rc, shown):
    broker = f'{{url: {URL}, username: "${{PT_USER}}", password: {password}{extra}}}'
    out = check(write(BASE.replace(f"{{url: {URL}}}", broker)), PT_SECRET=SECRET, PT_USER="bob")
    assert out.returncode == rc and shown in out.stdout + out.stderr, out.stdout + out.stderr
    assert SECRET not in out.stdout + out.stderr


def test_check_never_prints_a_numeric_password(write):
    out = check(write(BASE.replace(URL + "}", URL + ", password: 98765432}")))
    assert out.returncode == 2 and "brokers.local.password" in out.stderr
    assert "98765432" not in out.stdout + out.stderr
