"""The old runtime's configuration files, in the shapes its users hold (tests/data/pyboot/*.yaml are copies of
the examples in shared/pyboot/, one per shape): conversion to the native config, the warnings where a file
behaves differently than before, refusals naming file, key path and text, device filters parsed without eval,
and an old-style model zip run through an old-format config."""

from __future__ import annotations

import copy
import io
import logging
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_packages import FAST, FileServer, digests

from pipeline.config import load as config
from pipeline.config.pyboot import convert, is_pyboot
from pipeline.errors import ConfigError
from pipeline.models import loader as model
from pipeline.models.filters import filter_problems, matches, parse_expression
from pipeline.models.packages import ModelSource, resolve

DATA = Path(__file__).parent / "data" / "pyboot"
ROOT = Path(__file__).parent.parent
EXAMPLES = ("v1-readme", "v2-device", "v3-devices", "v3-single-address")
NAME = '== data_to_dict["deviceInfo"]["deviceName"]'
PLACEHOLDER = "1B2M2Y8AsgTpgAmY7PhCfg=="  # the examples' modelMd5: the MD5 of an empty file
CONVERTED = {"md5": PLACEHOLDER, "insecure": True}  # an http url with an md5: kept working, with insecure


def example(name: str) -> dict[str, Any]:
    return yaml.safe_load((DATA / f"{name}.yaml").read_text(encoding="utf-8"))


def cond(path: list[str], op: str, value: Any) -> dict[str, Any]:
    return {"path": path, "op": op, "value": value}


def device(name: str, point: str | None = None) -> dict[str, Any]:
    """The native filter of one device: its name, and a point its telemetry must carry."""
    tests = [cond(["deviceInfo", "deviceName"], "==", name)]
    return {"all": tests + ([cond(["telemetry"], "contains", point)] if point else [])}


SKIP = ["{}", "null"]
BROKER = "mosquitto-20336454"
IN, OUT = "cloud/edge-data-access-a60c2306", "cloud/edge-pyboot-out-e060ff31"
V3_DEVICES = {
    "brokers": {BROKER: {"url": "mqtt://127.0.0.1:1883"}},
    "models": {
        "multivariate": {"urls": {"amd64": "http://127.0.0.1:8080/models/multivariate-amd64.zip",
                                  "arm64": "http://127.0.0.1:8080/models/multivariate-arm64.zip"},
                         "md5": PLACEHOLDER, "insecure": True},
        "trend_detection": {"urls": {"amd64": "http://127.0.0.1:8080/models/trend_detection.zip"}, "insecure": True},
    },
    "rules": [
        {"name": "r0-f0-multivariate", "sub": {"broker": BROKER, "topic": IN, "qos": 0}, "model": "multivariate",
         "pub": {"broker": BROKER, "topic": OUT, "qos": 0, "retain": False},
         "timeout": 100, "filter": device("三厂-压缩机1", "排气压力"), "skip_results": SKIP},
        {"name": "r0-f1-trend_detection", "sub": {"broker": BROKER, "topic": IN, "qos": 0}, "model": "trend_detection",
         "pub": {"broker": BROKER, "topic": OUT, "qos": 0, "retain": False},
         "timeout": 100, "filter": device("三厂-压缩机2", "RC_cylinder1_dispPeak"), "skip_results": SKIP},
    ],
}


def test_version_3_converts_to_the_native_config():
    conversion = convert(example("v3-devices"), DATA / "v3-devices.yaml")
    assert conversion.native == V3_DEVICES and conversion.version == "3"
    assert yaml.safe_dump(conversion.native).count("&id") == 0  # no shared objects: `convert` prints no anchors
    assert conversion.ignored == ["expose", "clientId (MQTT client ids are derived per stack)"]


@pytest.mark.parametrize(("name", "version", "rule", "model", "filter"), [
    ("v1-readme", "1", "r0-f0-threshold_check",
     {"url": "http://127.0.0.1:8080/group1/M00/00/01/threshold.zip", **CONVERTED}, device("泵站-1", "出口温度")),
    ("v2-device", "2", "r0-f0-TYPE_TREND_WARNING1700000000000",
     {"url": "http://127.0.0.1:8080/group1/M00/00/02/trend.zip", **CONVERTED}, device("泵站-2", "振动")),
    ("v3-single-address", "3", "r0-f0-industry",
     {"url": "http://127.0.0.1:8080/models/industry.zip", **CONVERTED}, device("boiler-7")),
])
def test_versions_1_2_and_single_address_convert(name, version, rule, model, filter):
    conversion = convert(example(name), DATA / f"{name}.yaml")
    native = conversion.native
    assert conversion.version == version
    assert [r["name"] for r in native["rules"]] == [rule]
    assert list(native["models"].values()) == [model]
    assert native["rules"][0]["filter"] == filter and native["rules"][0]["skip_results"] == SKIP


def test_defaults_of_the_old_runtime():
    """qos missing: 0; retain missing: false; pub.timeout missing: 10s; a bare number: seconds."""
    v2 = convert(example("v2-device")).native["rules"][0]
    assert v2["sub"]["qos"] == 0 and v2["pub"] == {**v2["pub"], "qos": 0, "retain": False} and v2["timeout"] == 100
    raw = example("v3-single-address")
    del raw["rules"][0]["pub"]["timeout"], raw["mqtts"][0]["retain"]
    rule = convert(raw).native["rules"][0]
    assert rule["timeout"] == "10s" and rule["sub"]["qos"] == 1 and rule["pub"]["retain"] is False


def test_every_rule_crossed_with_every_func():
    raw = example("v3-devices")
    raw["rules"].append({"sub": {"name": "mosquitto-20336454", "topic": "second/in"},
                         "pub": {"name": "mosquitto-20336454", "topic": "second/out", "timeout": "5s"}})
    rules = convert(raw).native["rules"]
    assert [(r["name"], r["sub"]["topic"], r["model"], r["pub"]["topic"], r["timeout"]) for r in rules] == [
        ("r0-f0-multivariate", IN, "multivariate", OUT, 100),
        ("r0-f1-trend_detection", IN, "trend_detection", OUT, 100),
        ("r1-f0-multivariate", "second/in", "multivariate", "second/out", "5s"),
        ("r1-f1-trend_detection", "second/in", "trend_detection", "second/out", "5s"),
    ]


def test_names_stay_unique_and_valid_for_long_and_chinese_model_names(tmp_path):
    raw = example("v3-devices")
    raw["funcs"][0]["modelName"] = "三厂压缩机多变量模型"
    raw["funcs"][1]["modelName"] = "x" * 200
    raw["funcs"].append({**copy.deepcopy(raw["funcs"][1]), "modelAmd64Address": "http://h/other.zip"})
    native = convert(raw).native
    assert [r["name"] for r in native["rules"]] == ["r0-f0", "r0-f1-" + "x" * 57, "r0-f2-" + "x" * 57]
    assert list(native["models"]) == ["func0", "x" * 63, "x" * 58 + "-2"]
    config.parse(native, tmp_path / "old.yaml")  # every name is a valid native name


@pytest.mark.parametrize("name", EXAMPLES)
def test_check_accepts_each_example_as_it_is(name):
    out = subprocess.run([sys.executable, "-m", "pipeline", "check", "-c", DATA / f"{name}.yaml"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"old runtime format, version {name[1]}: converted" in out.stdout
    assert ("ignored: expose" in out.stdout) is ("expose" in example(name))
    assert f"warning: funcs[0].{'modelMd5' if name[1] == '3' else 'model_md5'}: {PLACEHOLDER} is the MD5 of an " \
        "empty file" in out.stdout


@pytest.mark.parametrize("name", EXAMPLES)
def test_convert_output_checks_and_is_equivalent(name, tmp_path):
    out = subprocess.run([sys.executable, "-m", "pipeline", "convert", DATA / f"{name}.yaml"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "warning: a model exception goes to the rule's error topic" in out.stderr
    assert "# warning: a model exception goes to the rule's error topic" in out.stdout  # kept beside the config
    converted = tmp_path / f"{name}.yaml"
    converted.write_text(out.stdout, encoding="utf-8")
    native = config.load_file(converted)
    old = config.load_file(DATA / f"{name}.yaml")
    assert native.conversion is None and old.conversion is not None
    assert native.config.instance == old.config.instance  # the same stack: client ids, run and data directory
    assert native.config.model_dump(exclude={"source", "name"}) == old.config.model_dump(exclude={"source", "name"})


def test_old_and_native_formats_are_told_apart():
    assert all(is_pyboot(example(name)) for name in EXAMPLES)
    assert not is_pyboot(yaml.safe_load((ROOT / "conf" / "example.yaml").read_text()))
    assert not is_pyboot(["mqtts"]) and not is_pyboot({"mqtts": [], "brokers": {}})


def test_native_sections_added_to_an_old_file_are_kept(tmp_path):
    raw = example("v3-single-address")
    raw["control"] = {"listen": "127.0.0.1:6123", "token": "x" * 16}
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    cfg = config.load(tmp_path / "old.yaml")
    assert cfg.control.listen == "127.0.0.1:6123" and cfg.rule("r0-f0-industry").filter == device("boiler-7")


# ------------------------------------------------------------------------------------------ device selection

def v1_func(**keys: Any) -> dict[str, Any]:
    raw = example("v1-readme")
    raw["funcs"][0].update(keys)
    return raw


def test_version_1_an_empty_point_name_means_any_point():
    assert convert(v1_func(pointName="")).native["rules"][0]["filter"] == device("泵站-1")


def test_version_2_needs_all_four_keys_and_quotes_the_value():
    raw = example("v2-device")
    entry = raw["funcs"][0]["device"][0]
    entry["deviceName"] = 1001  # the old runtime wrote '1001' == ...: a string
    assert convert(raw).native["rules"][0]["filter"] == device("1001", "振动")
    del entry["pointParseExpression"]
    with pytest.raises(ConfigError) as e:
        convert(raw, "old.yaml")
    assert e.value.problems == ["funcs[0].device[0]: pointParseExpression missing (a test needs pointName and "
                                "pointParseExpression)"]


def test_version_3_both_quote_styles_and_keys():
    raw = example("v3-devices")
    attrs = raw["funcs"][0]["devices"][0]["deviceAttr"]
    attrs[0]["attrExpression"] = NAME
    attrs[1]["attrExpression"] = "in data_to_dict['telemetry'].keys()"
    assert convert(raw).native["rules"][0]["filter"] == device("三厂-压缩机1", "排气压力")


@pytest.mark.parametrize(("devices", "then"), [
    (None, "no devices"),
    ([], "no devices"),
])
def test_a_func_without_devices_processes_nothing_as_before(devices, then):
    raw = example("v3-devices")
    if devices is None:
        del raw["funcs"][1]["devices"]
    else:
        raw["funcs"][1]["devices"] = devices
    conversion = convert(raw)
    rule = conversion.native["rules"][1]
    assert rule["filter"] == {"any": []} and not matches(rule["filter"], {"deviceInfo": {"deviceName": "三厂-压缩机2"},
                                                                          "telemetry": {"RC_cylinder1_dispPeak": 1}})
    assert any(w.startswith(f"funcs[1]: {then}: like the old runtime, its rules process no message")
               for w in conversion.warnings)


# ------------------------------------------------------------------------ where a file behaves differently

def test_warning_only_the_last_attribute_decided_before():
    conversion = convert(example("v3-devices"))
    assert "funcs[0].devices[0].deviceAttr: 2 tests; the old runtime applied only the last one ('排气压力' in " \
           "data_to_dict['telemetry']), here all of them must hold" in "\n".join(conversion.warnings)
    single = convert(example("v3-single-address"))
    assert not any("deviceAttr" in w for w in single.warnings)


def test_warning_a_message_matching_two_devices_ran_twice():
    raw = example("v3-devices")
    devices = raw["funcs"][0]["devices"]
    devices.append(copy.deepcopy(devices[0]))  # the same device twice
    other = copy.deepcopy(devices[0])
    other["deviceAttr"][0]["attrValue"] = "三厂-压缩机9"  # another device: never both
    devices.append(other)
    warnings = convert(raw).warnings
    assert "funcs[0].devices[0] and devices[1] can both match one message: the old runtime ran such a message " \
           "through the model once per device, here once" in warnings
    assert not any("can both match" in w and "devices[2]" in w for w in warnings)


def test_warning_version_1_two_funcs_matching_one_message():
    raw = example("v1-readme")
    raw["funcs"].append({**raw["funcs"][0], "modelName": "second", "pointName": ""})
    raw["funcs"].append({**raw["funcs"][0], "modelName": "third", "deviceName": "泵站-9"})
    warnings = convert(raw).warnings
    assert any(w.startswith("funcs[0] and funcs[1] can both match one message: the old runtime published only the "
                            "last one's result") for w in warnings)
    assert not any("can both match" in w and "funcs[2]" in w for w in warnings)


def test_warnings_qos_2_and_one_checksum_for_two_archives():
    raw = example("v3-devices")
    raw["mqtts"][0]["qos"] = 2
    conversion = convert(raw)  # funcs[0]: the empty file's MD5, and one checksum for two archives: both said
    assert "mqtts[0].qos: 2 becomes 1 here (at least once: a message may come twice)" in conversion.warnings
    assert any(w.startswith("funcs[0].modelMd5: one checksum for two archives") for w in conversion.warnings)
    assert conversion.native["rules"][0]["sub"]["qos"] == 1


def test_http_and_missing_checksums_convert_with_insecure_and_a_warning_each():
    conversion = convert(example("v3-devices"))  # funcs[0]: http with an md5; funcs[1]: http without one
    assert [w for w in conversion.warnings if "insecure" in w or "md5 is weak" in w] == [
        "funcs[0].modelMd5: md5 is weak (archives with the same MD5 can be made): convert the file and give sha256",
        "funcs[0].modelAmd64Address: plain http: converted with insecure: true so that it is fetched as before; "
        "serve it over https",
        "funcs[1].modelAmd64Address: plain http: converted with insecure: true so that it is fetched as before; "
        "serve it over https",
        "funcs[1]: no modelMd5: converted with insecure: true, the model is fetched unchecked as before; add "
        "modelMd5 (the archive's: openssl md5 -binary ARCHIVE | base64), or convert the file and give sha256"]
    raw = example("v3-single-address")
    raw["funcs"][0]["modelAddress"] = "https://files.example/models/industry.zip"
    assert convert(raw).native["models"]["industry"] == {"url": "https://files.example/models/industry.zip",
                                                         "md5": PLACEHOLDER}  # https and a checksum: not insecure


# --------------------------------------------------------------------------------------------- refusals

@pytest.mark.parametrize(("name", "change", "problem"), [
    ("v3-devices", lambda r: r["funcs"][1].update(modelMD5="x"),
     "funcs[1].modelMD5: unknown key, read as a misspelling of 'modelMd5' (got 'modelMD5')"),
    ("v3-devices", lambda r: r["funcs"][0].update(devcies=r["funcs"][0].pop("devices")),
     "funcs[0].devcies: unknown key, read as a misspelling of 'devices' (got 'devcies')"),
    ("v3-devices", lambda r: r.update(mqtt=r.pop("mqtts")) or r.update(mqtts=r["mqtt"]),
     "mqtt: unknown key, read as a misspelling of 'mqtts' (got 'mqtt')"),
    ("v3-devices", lambda r: r["funcs"][1].update(model_address="http://h/m.zip"),
     "funcs[1]: mixes the keys of two versions of the old format: devices, modelAmd64Address, model_address"),
    ("v3-devices", lambda r: r["funcs"].append(example("v1-readme")["funcs"][0]),
     "funcs: the funcs mix the shapes of two versions of the old format: funcs[0] has modelAmd64Address, "),
    ("v3-devices", lambda r: r["funcs"][1]["devices"][0]["deviceAttr"][1].pop("attrExpression"),
     "funcs[1].devices[0].deviceAttr[1]: attrExpression missing"),
    ("v3-devices", lambda r: r["funcs"][1]["devices"][0]["deviceAttr"][1].update(attrExpression="in os.environ"),
     "funcs[1].devices[0].deviceAttr[1].attrExpression: unsupported filter expression 'in os.environ'"),
    ("v3-devices", lambda r: r["funcs"][0]["devices"][0].update(deviceAttr=[]),
     "funcs[0].devices[0].deviceAttr: expected a non-empty list"),
    ("v2-device", lambda r: r["funcs"][0]["device"][0].update(deviceParseExpression="== __import__('os')"),
     "funcs[0].device[0].deviceParseExpression: unsupported filter expression \"== __import__('os')\""),
    ("v3-devices", lambda r: r["rules"][0]["sub"].update(name="mosquitto-20336455"),
     "rules[0].sub.name: no mqtts entry is named 'mosquitto-20336455' (defined: 'mosquitto-20336454'); did you mean "
     "'mosquitto-20336454'?"),
    ("v1-readme", lambda r: r["rules"][0]["pub"].update(topic="out/{0}/x"),
     "rules[0].pub.topic: braces are {N} placeholders here, and the old runtime published the topic as written"),
    ("v1-readme", lambda r: r["funcs"][0].update(model_address="http://[::1/x.zip"),
     "funcs[0].model_address: expected an http(s) url, or a file:// url or absolute path of an existing file"),
    ("v1-readme", lambda r: r["funcs"][0].update(model_address="10.200.60.18:22122/group1/M00/x.zip"),
     "funcs[0].model_address: expected an http(s) url, or a file:// url or absolute path of an existing file "
     "(got '10.200.60.18:22122/group1/M00/x.zip')"),
    ("v1-readme", lambda r: r["funcs"][0].update(model_address="/no\x00where.zip"),
     "funcs[0].model_address: expected an http(s) url"),
    ("v1-readme", lambda r: r["rules"][0]["sub"].update(topci=r["rules"][0]["sub"].pop("topic")),
     "rules[0].sub.topci: unknown key, read as a misspelling of 'topic'"),
    ("v1-readme", lambda r: r["mqtts"][0].update(Name=r["mqtts"][0].pop("name")),
     "mqtts[0].Name: unknown key, read as a misspelling of 'name'"),
    ("v3-devices", lambda r: (d := r["funcs"][0]["devices"][0]).update(deviceAtrr=d.pop("deviceAttr")),
     "funcs[0].devices[0].deviceAtrr: unknown key, read as a misspelling of 'deviceAttr'"),
    ("v1-readme", lambda r: r["funcs"].insert(0, 1), "funcs[0]: expected a mapping with modelName: and a model address "
     "(got 1)"),
    ("v1-readme", lambda r: r["rules"][0]["sub"].update(topic="a/#/b"),
     "rules[0]: '#' must be a whole level and the last one"),
    ("v1-readme", lambda r: r["funcs"][0].update(model_md5="nope"),
     "funcs[0].model_md5: md5 'nope' is neither"),
    ("v1-readme", lambda r: r["funcs"][0].pop("model_address"), "funcs[0]: no model address: expected model_address"),
    ("v3-devices", lambda r: r["funcs"][1].update(modelAmd64Address="ftp://h/m.zip"),
     "funcs[1].modelAmd64Address: expected an http:// or https:// url (got 'ftp://h/m.zip')"),
    ("v3-devices", lambda r: r["funcs"][1].pop("modelName"), "funcs[1].modelName: required"),
    ("v3-devices", lambda r: r.update(funcs=[{"modelName": "m"}]),
     "funcs[0]: no model address: expected model_address (versions 1 and 2) or modelAddress / modelAmd64Address"),
    ("v1-readme", lambda r: r["mqtts"][0].update(broker="http://h:1"), "mqtts[0].broker: expected tcp://HOST:PORT"),
    ("v1-readme", lambda r: r["mqtts"][0].update(qos=3), "mqtts[0].qos: expected 0, 1 or 2 (got 3)"),
    ("v1-readme", lambda r: r["mqtts"][0].update(retain="no"), "mqtts[0].retain: expected true or false (got 'no')"),
    ("v1-readme", lambda r: r["mqtts"].append({"name": "b1", "broker": "tcp://h:1"}),
     "mqtts[1].name: duplicate connection name 'b1'"),
    ("v1-readme", lambda r: r["rules"][0].update(funcs=r.pop("funcs")),
     "rules[0].funcs: funcs belong at the top level of the file"),
])
def test_refusals_name_the_key_path_and_the_text(name, change, problem):
    raw = example(name)
    change(raw)
    with pytest.raises(ConfigError) as e:
        convert(raw, "old.yaml")
    assert e.value.path == "old.yaml"
    assert any(p.startswith(problem) for p in e.value.problems), e.value.problems


def test_check_exits_2_naming_file_key_and_text_and_nothing_starts(tmp_path):
    raw = example("v3-devices")
    raw["funcs"][1]["devices"][0]["deviceAttr"].append({"attrName": "x", "attrValue": "y", "attrExpression": "== 1"})
    raw["funcs"][0]["modelMD5"] = raw["funcs"][0].pop("modelMd5")
    bad = tmp_path / "old.yaml"
    bad.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    for command in (["check", "-c", bad], ["convert", bad], ["up", "-c", bad, "--run-dir", tmp_path / "run"]):
        out = subprocess.run([sys.executable, "-m", "pipeline", *command], cwd=ROOT, capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 2, (command, out.stderr)
        assert f"{bad}: 2 problem(s)" in out.stderr
        assert "funcs[0].modelMD5: unknown key, read as a misspelling of 'modelMd5'" in out.stderr
        assert "funcs[1].devices[0].deviceAttr[2].attrExpression: unsupported filter expression '== 1'" in out.stderr
    assert not (tmp_path / "run" / "supervisord.conf").exists()


def test_a_password_is_never_shown_and_long_values_are_cut():
    raw = example("v1-readme")
    del raw["mqtts"][0]["name"]
    raw["mqtts"][0]["password"] = "SECRETPW"
    raw["funcs"][0]["model_address"] = "x" * 100_000
    with pytest.raises(ConfigError) as e:
        convert(raw, "old.yaml")
    text = "\n".join(e.value.problems)
    assert "SECRETPW" not in text and "'password': '***'" in text and len(text) < 2000


def test_what_the_old_runtime_never_read_is_not_refused_but_warned(tmp_path, monkeypatch):
    raw = example("v3-devices")
    raw["rules"][0]["pub"]["timeout"] = "1m30s"  # never read by the old runtime: the default, with a warning
    raw["funcs"][0]["devices"][0]["deviceAttr"][0]["attrValue"] = "O'Brien"
    conversion = convert(raw)
    assert conversion.native["rules"][0]["timeout"] == "10s"
    assert any(w.startswith("rules[0].pub.timeout: '1m30s' is not a duration this runtime can enforce")
               for w in conversion.warnings)
    assert any(w.startswith("funcs[0].devices[0].deviceAttr[0].attrValue: \"O'Brien\" holds a quote")
               for w in conversion.warnings)


def test_old_values_are_not_expanded_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DEV", "other")
    raw = example("v3-single-address")
    raw["funcs"][0]["devices"][0]["deviceAttr"][0]["attrValue"] = "${DEV}"
    raw["control"] = {"listen": "${LISTEN:-127.0.0.1:6124}"}  # a native section: expanded, as in a native file
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    cfg = config.load(tmp_path / "old.yaml")
    assert cfg.rules[0].filter == device("${DEV}") and cfg.control.listen == "127.0.0.1:6124"


@pytest.mark.parametrize("text", ["x: " + "[" * 3000 + "]" * 3000, "brokers: &c {x: *c}"])
def test_a_file_nested_too_deeply_is_a_config_error(tmp_path, text):
    (tmp_path / "deep.yaml").write_text(text)
    with pytest.raises(ConfigError, match="nested too deeply"):
        config.load(tmp_path / "deep.yaml")


def test_every_problem_is_reported_at_once():
    raw = example("v3-devices")
    raw["funcs"][0]["modelMd5"] = "nope"
    raw["rules"][0]["pub"]["name"] = "x"
    with pytest.raises(ConfigError) as e:
        convert(raw, "old.yaml")
    assert [p.split(":")[0] for p in e.value.problems] == ["funcs[0].modelMd5", "rules[0].pub.name"]


# ---------------------------------------------------------------------------------- expressions and filters

@pytest.mark.parametrize(("expression", "value", "expected"), [
    (NAME, "d1", cond(["deviceInfo", "deviceName"], "==", "d1")),
    ("==data_to_dict['deviceInfo']['deviceName']", "d1", cond(["deviceInfo", "deviceName"], "==", "d1")),
    ('  ==  data_to_dict [ "deviceInfo" ] [ "pointName" ]  ', "temp", cond(["deviceInfo", "pointName"], "==", "temp")),
    ('in data_to_dict["telemetry"]', "temp", cond(["telemetry"], "contains", "temp")),
    ("in data_to_dict['telemetry']", "排气压力", cond(["telemetry"], "contains", "排气压力")),
    ('in data_to_dict["telemetry"].keys()', "temp", cond(["telemetry"], "contains", "temp")),
    ('== data_to_dict["deviceInfo"]["deviceId"]', 42, cond(["deviceInfo", "deviceId"], "==", 42)),
])
def test_accepted_expressions(expression, value, expected):
    assert parse_expression(expression, value) == expected


@pytest.mark.parametrize("expression", [
    '__import__("os").system("rm -rf /")',
    '== data_to_dict["deviceInfo"]["deviceName"] or True',
    '== data_to_dict["a"]; import os',
    '== data_to_dict["a"]()',
    '== data_to_dict["a"].keys()',
    '!= data_to_dict["a"]',
    'not in data_to_dict["a"]',
    '== data_to[“a”]',
    "== data_to_dict[0]",
    "== data_to_dict[a]",
    "in data_to_dict",
    '== data_to_dict["a"]["b"',
    '== data_to_dict["a" + "b"]',
    "",
    None,
])
def test_refused_expressions(expression):
    with pytest.raises(ValueError, match="unsupported filter expression") as e:
        parse_expression(expression, "d1")
    assert repr(expression) in str(e.value)


EVENT = {"deviceInfo": {"deviceName": "d1", "tags": ["hot", "north"], "id": 7},
         "telemetry": {"ts": 1700000000000, "temp": 21.5}, "note": "alarm: high"}
D1 = cond(["deviceInfo", "deviceName"], "==", "d1")
TEMP = cond(["telemetry"], "contains", "temp")


@pytest.mark.parametrize(("filter", "event", "expected"), [
    (D1, EVENT, True),
    (cond(["deviceInfo", "deviceName"], "==", "d2"), EVENT, False),
    (cond(["deviceInfo", "deviceName"], "!=", "d2"), EVENT, True),
    (cond(["deviceInfo", "id"], "==", "7"), EVENT, False),  # no coercion, as Python compares
    (TEMP, EVENT, True),
    (cond(["deviceInfo", "tags"], "contains", "hot"), EVENT, True),
    (cond(["note"], "contains", "high"), EVENT, True),
    (cond(["missing", "deeper"], "==", None), EVENT, False),  # a missing field fails every condition
    (cond(["note", "deeper"], "==", "x"), EVENT, False),
    (D1, [1, 2], False),
    (D1, None, False),
    ({"all": [D1, TEMP]}, EVENT, True),
    ({"all": [D1, cond(["telemetry"], "contains", "flow")]}, EVENT, False),
    ({"any": [cond(["telemetry"], "contains", "flow"), D1]}, EVENT, True),
    ({"any": []}, EVENT, False),
])
def test_matches(filter, event, expected):
    assert filter_problems(filter) == []
    assert matches(filter, event) is expected


@pytest.mark.parametrize(("filter", "problem"), [
    ([], "filter: expected a mapping"),
    ({"all": D1}, "filter: 'all' must be the only key"),
    ({"any": [{"path": [], "op": "==", "value": 1}]}, "filter.any[0].path: expected a non-empty list"),
    ({"path": ["a"], "op": "~=", "value": 1}, "filter.op: expected one of ==, !=, contains"),
    ({"path": ["a"], "op": "==", "value": 1, "eval": "x"}, "filter.eval: unknown key"),
])
def test_filter_problems(filter, problem):
    assert problem in "\n".join(filter_problems(filter))


# ------------------------------------------------------------------------------------------ old-style models

@pytest.fixture
def isolated_imports():
    """model.load edits sys.path and sys.modules: undo it."""
    yield
    for name in model.loaded():
        model.unload(name)


def old_style_zip(tmp_path: Path, top: str = "model") -> bytes:
    """Built like the old zips: one top folder, a flat index.py with handler(event, content), a `*.model` pickle
    of a class from a helper package, found by listing the folder."""
    tree = tmp_path / "build" / top
    shutil.copytree(DATA / "old-model", tree, ignore=shutil.ignore_patterns("__pycache__"))
    pickling = "import pickle; from helpers.scaler import Scaler; pickle.dump(Scaler(2, 1), open('scaler.model', 'wb'))"
    subprocess.run([sys.executable, "-c", pickling], cwd=tree, check=True)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(tree.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                z.write(path, str(path.relative_to(tree.parent)))
    return out.getvalue()


def test_an_old_style_zip_runs_through_an_old_format_config(tmp_path, isolated_imports):
    archive = old_style_zip(tmp_path, "threshold")
    files = FileServer()
    raw = example("v1-readme")
    raw["funcs"][0]["model_address"] = files.serve("/group1/M00/00/01/threshold.zip", archive)
    raw["funcs"][0]["model_md5"] = digests(archive)[2]
    try:
        native = convert(raw).native
        spec = native["models"]["threshold_check"]
        source = ModelSource(url=spec["url"], md5=spec["md5"], insecure=spec["insecure"])  # as converted: http, md5
        folder = resolve("threshold_check", source, tmp_path / "data", FAST)
    finally:
        files.stop()
    assert folder.name == "threshold" and files.hits == ["/group1/M00/00/01/threshold.zip"]
    loaded = model.load("threshold_check", folder)
    event = {"deviceInfo": {"deviceName": "泵站-1"}, "telemetry": {"ts": 1700000000000, "出口温度": 21.5}}
    assert matches(native["rules"][0]["filter"], event)
    context = model.Context("r0-f0-threshold_check", "threshold_check", {}, logging.getLogger("threshold"))
    assert loaded.handler(event, context) == {"deviceName": "泵站-1", "ts": 1700000000000, "points": {"出口温度": 44.0},
                                              "models": ["scaler"]}
