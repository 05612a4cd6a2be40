"""The configuration of shadows and canaries: defaults, the companion rules they run as, and every error naming
the file, the key and the value."""

from __future__ import annotations

import pytest

from pipeline.config import load as config
from pipeline.config import snapshot
from pipeline.errors import ConfigError

BASE = """\
brokers:
  local: {url: "mqtt://127.0.0.1:1883"}
models:
  m: {path: model}
  c: {path: model}
rules:
  - name: r1
    sub: {broker: local, topic: "a/+/b", qos: 1}
    model: m
    pub: {broker: local, topic: "out/{1}", qos: 1}
"""


@pytest.fixture
def load(tmp_path):
    """load(extra rule lines) -> the Config of BASE with those lines added to rule r1."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "index.py").write_text("def handler(event, context):\n    return event\n")

    def make(extra: str) -> config.Config:
        (tmp_path / "pipeline.yaml").write_text(BASE + extra)
        return config.load(tmp_path / "pipeline.yaml")

    return make


def test_defaults_and_companions(load):
    cfg = load("    shadow: {model: c}\n    canary: {model: c}\n")
    assert [r.name for r in cfg.rules] == ["r1", "r1~shadow", "r1~canary"]
    assert [r.name for r in cfg.live_rules()] == ["r1"]
    canary = cfg.rules[0].canary
    assert (canary.percent, canary.key, canary.max_error_rate, canary.max_p99, canary.window, canary.then,
            canary.workers) == (10.0, None, 0.01, None, 60.0, "rollback", 1)
    shadow, candidate = cfg.rules[1], cfg.rules[2]
    assert (shadow.trial, shadow.trial_of, shadow.model, shadow.workers) == ("shadow", "r1", "c", 1)
    assert cfg.rules[0].shadow.percent == 100.0
    assert load('    shadow: {model: c, percent: "25%"}\n').rules[0].shadow.percent == 25.0
    assert (shadow.pub.topic, shadow.pub.qos, shadow.error_topic) == ("pipeline/shadow/r1", 0,
                                                                       "pipeline/shadow/r1/errors")
    assert (candidate.trial, candidate.pub.topic, candidate.pub.qos) == ("canary", "out/{1}", 1)
    assert candidate.error_topic == "pipeline/errors/r1"  # the live rule's: its error records are the rule's
    assert shadow.shadow is None and candidate.canary is None and shadow.sub == cfg.rules[0].sub


def test_units_of_a_canary(load):
    canary = load('    canary: {model: c, percent: "25%", max_error_rate: 0.5%, max_p99: 50ms, window: 2m, '
                  "then: promote, key: deviceName, workers: 2}\n").rules[0].canary
    assert (canary.percent, canary.max_error_rate, canary.max_p99, canary.window, canary.then, canary.key,
            canary.workers) == (25.0, 0.005, 0.05, 120.0, "promote", ["deviceName"], 2)
    assert load("    canary: {model: c, max_error_rate: 0.02}\n").rules[0].canary.max_error_rate == 0.02


def test_the_stages_read_the_companions_from_the_snapshot(load, tmp_path, monkeypatch):
    cfg = load("    shadow: {model: c}\n    canary: {model: c, percent: 5}\n")
    monkeypatch.setenv(snapshot.RUN, "run-1")
    assert snapshot.write(tmp_path, cfg, "run-1") == []
    back = snapshot.read(tmp_path, cfg.source)
    assert back.model_dump() == cfg.model_dump() and [r.trial for r in back.rules] == [None, "shadow", "canary"]
    assert cfg.with_workers({"r1~shadow": 3}).rule("r1~shadow").workers == 3


@pytest.mark.parametrize("extra, problem", [
    ("    shadow: {model: nope}\n",
     "rules[0].shadow.model: no model named 'nope' is defined under 'models:' (defined: c, m) (got 'nope')"),
    ("    shadow: {model: m}\n",
     "rules[0].shadow.model: the candidate must be another model than the rule's (model: m) (got 'm')"),
    ("    shadow: {model: c, wokers: 2}\n", "rules[0].shadow.wokers: unknown key"),
    ("    canary: {model: m}\n",
     "rules[0].canary.model: the candidate must be another model than the rule's (model: m) (got 'm')"),
    ("    canary: {model: c, percent: 0}\n", "rules[0].canary.percent: Input should be greater than 0 (got 0)"),
    ("    canary: {model: c, percent: 120%}\n",
     "rules[0].canary.percent: Input should be less than or equal to 100 (got '120%')"),
    ("    canary: {model: c, percent: ten}\n",
     "rules[0].canary.percent: expected a percentage such as 10 or 10% (got 'ten')"),
    ("    canary: {model: c, max_error_rate: 1 percent}\n",
     "rules[0].canary.max_error_rate: expected a share such as 1% or 0.01 (got '1 percent')"),
    ("    canary: {model: c, max_error_rate: 5}\n",
     "rules[0].canary.max_error_rate: Input should be less than or equal to 1 (got 5)"),
    ("    canary: {model: c, max_p99: fast}\n",
     "rules[0].canary.max_p99: expected a duration such as 500ms, 10s, 2m, 1h or 7d (got 'fast')"),
    ("    canary: {model: c, window: 0s}\n", "rules[0].canary.window: Input should be greater than 0 (got '0s')"),
    ("    canary: {model: c, then: keep}\n",
     "rules[0].canary.then: Input should be 'promote' or 'rollback' (got 'keep')"),
    ("    canary: {model: c, key: '{3}'}\n", "rules[0].canary.key: "),
    ("    key: '{1}'\n    canary: {model: c}\n",
     "rules[0].canary: a canary on a rule with key: is not supported: each key's state would be split between two "
     "versions (a shadow keeps states of its own) (got 'c')"),
    ("    shadow: {model: c, percent: 0}\n", "rules[0].shadow.percent: Input should be greater than 0 (got 0)"),
    ("    key: '{1}'\n    shadow: {model: c, percent: 50}\n",
     "rules[0].shadow.percent: a keyed rule's shadow gets every message (its states follow each key's whole history): "
     "leave shadow.percent out (got 50.0)"),
    ("    trial: shadow\n",
     "rules[0].trial: trial is set by the stack on a shadow's or canary's companion rule, not in a file"),
])
def test_errors_name_the_file_the_key_and_the_value(load, extra, problem):
    with pytest.raises(ConfigError) as e:
        load(extra)
    assert e.value.path.endswith("pipeline.yaml")
    assert any(p.startswith(problem) for p in e.value.problems), e.value.problems


def test_a_rule_name_with_a_tilde_is_refused(load):
    with pytest.raises(ConfigError) as e:
        load("  - name: r1~shadow\n    sub: {broker: local, topic: x}\n    model: m\n"
             "    pub: {broker: local, topic: y}\n")
    assert any(p.startswith("rules[1].name: String should match pattern") for p in e.value.problems)


def test_a_shadow_of_a_keyed_rule_is_keyed_too(load):
    cfg = load("    key: '{1}'\n    shadow: {model: c}\n")
    assert cfg.rule("r1~shadow").key == ["{1}"]

