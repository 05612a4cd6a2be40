"""The old runtime's (pyboot v3) configuration: conversion to the native one, device filters parsed without
eval, and an old-style model zip run through an old-format config."""

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

from pipeline import config, model
from pipeline.errors import ConfigError
from pipeline.packages import ModelSource, resolve
from pipeline.pyboot import convert, filter_problems, is_pyboot, matches, parse_expression

DATA = Path(__file__).parent / "data" / "pyboot"
ROOT = Path(__file__).parent.parent
NAME = '== data_to_dict["deviceInfo"]["deviceName"]'


def old_config() -> dict[str, Any]:
    return yaml.safe_load((DATA / "old-config.yaml").read_text(encoding="utf-8"))


def cond(path: list[str], op: str, value: Any) -> dict[str, Any]:
    return {"path": path, "op": op, "value": value}


BOILER_FILTER = {"any": [
    {"all": [cond(["deviceInfo", "deviceName"], "==", "boiler-1"), cond(["telemetry"], "contains", "temp")]},
    {"all": [cond(["deviceInfo", "deviceName"], "==", "boiler-2"), cond(["telemetry"], "contains", "pressure")]},
]}
EXPECTED = {
    "brokers": {
        "edge-local": {"url": "mqtt://127.0.0.1:1883"},
        "mqtt1": {"url": "mqtts://cloud.example:8883", "username": "edge-7", "password": "s3cret"},
    },
    "models": {
        "trend": {"url": "http://files.example/group1/M00/00/0F/trend.zip", "md5": "pZ4DJ+YhYM9ppHD+VhLi+A=="},
        "anomaly": {"urls": {"amd64": "http://files.example/group1/M00/00/10/anomaly-amd64.zip",
                             "arm64": "http://files.example/group1/M00/00/10/anomaly-arm64.zip"}},
    },
    "rules": [
        {"name": "boiler-trend", "sub": {"broker": "edge-local", "topic": "plant/+/telemetry", "qos": 1},
         "model": "trend", "pub": {"broker": "mqtt1", "topic": "cloud/boiler/result", "qos": 1, "retain": True},
         "timeout": 10, "filter": BOILER_FILTER},
        {"name": "boiler-anomaly", "sub": {"broker": "edge-local", "topic": "plant/+/telemetry", "qos": 1},
         "model": "anomaly", "pub": {"broker": "mqtt1", "topic": "cloud/boiler/result", "qos": 1, "retain": True},
         "timeout": 10},
        {"name": "pump-trend", "sub": {"broker": "edge-local", "topic": "plant/+/telemetry", "qos": 1},
         "model": "trend", "pub": {"broker": "edge-local", "topic": "plant/pump/result", "qos": 1, "retain": False},
         "filter": {"all": [cond(["deviceInfo", "pointName"], "==", "flow")]}},
    ],
}


def test_old_config_converts_to_the_native_one():
    native = convert(old_config(), DATA / "old-config.yaml")
    assert native == EXPECTED
    assert yaml.safe_dump(native).count("&id") == 0  # no shared objects: `pipeline convert` prints no anchors


def test_converted_config_validates_once_models_and_filters_are_native(tmp_path):
    """Until config.py knows url/urls/md5 and filter, swap models for local folders and drop the filters."""
    native = convert(old_config(), DATA / "old-config.yaml")
    for name in native["models"]:
        native["models"][name] = {"path": str(DATA / "old-model")}
    for rule in native["rules"]:
        assert filter_problems(rule.pop("filter", {"all": []}), f"{rule['name']}.filter") == []
    cfg = config.parse(native, tmp_path / "old-config.yaml")
    assert [r.name for r in cfg.rules] == ["boiler-trend", "boiler-anomaly", "pump-trend"]
    assert cfg.brokers["mqtt1"].scheme == "mqtts" and cfg.rule("boiler-trend").timeout == 10.0


def test_old_and_native_formats_are_told_apart():
    assert is_pyboot(old_config())
    assert not is_pyboot(yaml.safe_load((ROOT / "conf" / "example.yaml").read_text()))
    assert not is_pyboot(["mqtts"]) and not is_pyboot({"mqtts": [], "brokers": {}})


@pytest.mark.parametrize(("expression", "value", "expected"), [
    (NAME, "d1", cond(["deviceInfo", "deviceName"], "==", "d1")),
    ("==data_to_dict['deviceInfo']['deviceName']", "d1", cond(["deviceInfo", "deviceName"], "==", "d1")),
    ('  ==  data_to_dict [ "deviceInfo" ] [ "pointName" ]  ', "temp", cond(["deviceInfo", "pointName"], "==", "temp")),
    ('== data_to_dict["pointName"]', "temp", cond(["pointName"], "==", "temp")),
    ('in data_to_dict["telemetry"]', "temp", cond(["telemetry"], "contains", "temp")),
    ('in data_to_dict["telemetry"].keys()', "temp", cond(["telemetry"], "contains", "temp")),
    ('in data_to_dict["telemetry"]["pointName"]', "temp", cond(["telemetry", "pointName"], "contains", "temp")),
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
    '== other["a"]',
    "== data_to_dict[0]",
    "== data_to_dict[a]",
    "in data_to_dict",
    '== data_to_dict["a"]["b"',
    '== data_to_dict["a" + "b"]',
    '== data_to_dict["a"].get("b")',
    "",
    None,
])
def test_refused_expressions(expression):
    with pytest.raises(ValueError, match="unsupported filter expression") as e:
        parse_expression(expression, "d1")
    assert repr(expression) in str(e.value)


def test_a_value_must_be_a_scalar():
    with pytest.raises(ValueError, match="must be a string or a number"):
        parse_expression(NAME, ["d1"])


EVENT = {"deviceInfo": {"deviceName": "d1", "pointName": "temp", "tags": ["hot", "north"], "id": 7},
         "telemetry": {"ts": 1700000000000, "temp": 21.5}, "note": "alarm: high"}
D1 = cond(["deviceInfo", "deviceName"], "==", "d1")
TEMP = cond(["telemetry"], "contains", "temp")


@pytest.mark.parametrize(("filter", "event", "expected"), [
    (D1, EVENT, True),
    (cond(["deviceInfo", "deviceName"], "==", "d2"), EVENT, False),
    (cond(["deviceInfo", "deviceName"], "!=", "d2"), EVENT, True),
    (cond(["deviceInfo", "id"], "==", 7), EVENT, True),
    (cond(["deviceInfo", "id"], "==", "7"), EVENT, False),  # no coercion, as Python compares
    (TEMP, EVENT, True),
    (cond(["telemetry"], "contains", "pressure"), EVENT, False),
    (cond(["deviceInfo", "tags"], "contains", "hot"), EVENT, True),
    (cond(["note"], "contains", "high"), EVENT, True),
    (cond(["note"], "contains", 1), EVENT, False),
    (cond(["deviceInfo", "id"], "contains", 7), EVENT, False),
    (cond(["missing", "deeper"], "==", None), EVENT, False),  # a missing field fails every condition
    (cond(["missing"], "!=", "x"), EVENT, False),
    (cond(["note", "deeper"], "==", "x"), EVENT, False),
    (D1, [1, 2], False),
    (D1, "text", False),
    (D1, None, False),
    ({"all": [D1, TEMP]}, EVENT, True),
    ({"all": [D1, cond(["telemetry"], "contains", "flow")]}, EVENT, False),
    ({"all": []}, EVENT, True),
    ({"any": [cond(["telemetry"], "contains", "flow"), D1]}, EVENT, True),
    ({"any": [cond(["telemetry"], "contains", "flow")]}, EVENT, False),
    ({"any": []}, EVENT, False),
    ({"any": [{"all": [D1, TEMP]}, {"all": [cond(["deviceInfo", "deviceName"], "==", "d2")]}]}, EVENT, True),
])
def test_matches(filter, event, expected):
    assert filter_problems(filter) == []
    assert matches(filter, event) is expected


def test_converted_filters_match_pyboot_messages():
    native = convert(old_config())
    boiler, pump = native["rules"][0]["filter"], native["rules"][2]["filter"]

    def msg(device: str, **telemetry: float) -> dict[str, Any]:
        return {"deviceInfo": {"deviceName": device, "pointName": "flow"}, "telemetry": {"ts": 1, **telemetry}}

    assert matches(boiler, msg("boiler-1", temp=80.0)) and matches(boiler, msg("boiler-2", pressure=2.0))
    assert not matches(boiler, msg("boiler-1", pressure=2.0))  # the old runtime checked only the last attribute
    assert not matches(boiler, msg("boiler-3", temp=80.0)) and matches(pump, msg("pump-1"))


@pytest.mark.parametrize(("filter", "problem"), [
    ([], "filter: expected a mapping"),
    ({"all": D1}, "filter: 'all' must be the only key"),
    ({"all": [], "any": []}, "filter: 'all' must be the only key"),
    ({"any": [{"path": [], "op": "==", "value": 1}]}, "filter.any[0].path: expected a non-empty list"),
    ({"path": ["a"], "op": "~=", "value": 1}, "filter.op: expected one of ==, !=, contains"),
    ({"path": ["a"], "op": "==", "value": {"x": 1}}, "filter.value: expected a string"),
    ({"path": ["a"], "op": "=="}, "filter.value: expected a string"),
    ({"path": ["a"], "op": "==", "value": 1, "eval": "x"}, "filter.eval: unknown key"),
])
def test_filter_problems(filter, problem):
    assert problem in "\n".join(filter_problems(filter))


Change = tuple[tuple[Any, ...], Any]  # (key path, new value); DROP removes the key
DROP = object()


def edit(*changes: Change) -> dict[str, Any]:
    """The old config with some keys set (a list index one past the end appends) or dropped."""
    raw = old_config()
    for path, value in changes:
        node = raw
        for key in path[:-1]:
            node = node[key]
        if value is DROP:
            del node[path[-1]]
        elif isinstance(node, list) and path[-1] == len(node):
            node.append(value)
        else:
            node[path[-1]] = value
    return raw


F0, F1 = ("rules", 0, "funcs", 0), ("rules", 0, "funcs", 1)
EVIL = "== __import__('os').getcwd()"


@pytest.mark.parametrize(("change", "problem"), [
    (((*F0, "devices", 1, "deviceAttr", 2), {"value": "x", "expression": EVIL}),
     "rules[0].funcs[0].devices[1].deviceAttr[2]: rule 'boiler', func 'trend': "
     f"unsupported filter expression {EVIL!r}"),
    (((*F1, "devices"), [{"deviceAttr": [{"expression": "in data_to_dict['t']"}]}]),
     "rules[0].funcs[1].devices[0].deviceAttr[0]: rule 'boiler', func 'anomaly': expected a mapping with value:"),
    ((("rules", 1, "funcs", 0, "devices"), [{"deviceName": "d1"}]),
     "rules[1].funcs[0].devices[0].deviceAttr: expected a list"),
    ((("rules", 0, "sub", "name"), "nowhere"),
     "rules[0].sub.name: no mqtts entry named 'nowhere' (defined: edge-local, 云端)"),
    ((("rules", 0, "sub", "timeout"), 0), "rules[0].sub.timeout: expected seconds"),
    ((("rules", 0, "pub", "topic"), DROP), "rules[0].pub: expected a mapping with name: (an mqtts entry) and topic:"),
    (((*F1, "modelName"), DROP), "rules[0].funcs[1].modelName: required"),
    (((*F0, "modelMd5"), "nope"), "rules[0].funcs[0].modelMd5: md5 'nope' is neither"),
    (((*F0, "modelAddress"), DROP), "rules[0].funcs[0]: expected modelAddress"),
    (((*F0, "modelAddress"), "ftp://x/m.zip"), "rules[0].funcs[0]: expected modelAddress"),
    ((("rules", 1, "funcs"), []), "rules[1]: expected a mapping with name:, sub:, pub: and a non-empty list funcs:"),
    ((("mqtts", 0, "broker"), "http://h:1"), "mqtts[0].broker: expected tcp://HOST:PORT"),
    ((("mqtts", 0, "broker"), "tcp://h:99999"), "mqtts[0].broker: Port out of range"),
    ((("mqtts", 1, "qos"), 3), "mqtts[1].qos: expected 0, 1 or 2 (got 3)"),
    ((("mqtts", 2), {"name": "edge-local", "broker": "tcp://h:1"}), "mqtts[2].name: duplicate connection name"),
    ((("mqtts",), DROP), "mqtts: expected a non-empty list"),
    ((("rules",), {}), "rules: expected a non-empty list"),
])
def test_conversion_problems_name_their_key_path(change, problem):
    with pytest.raises(ConfigError) as e:
        convert(edit(change), "old.yaml")
    assert e.value.path == "old.yaml"
    assert any(p.startswith(problem) for p in e.value.problems), e.value.problems


def test_every_problem_is_reported_at_once():
    raw = edit(((*F0, "modelMd5"), "nope"), (("rules", 1, "sub", "name"), "x"))
    with pytest.raises(ConfigError) as e:
        convert(raw, "old.yaml")
    assert [p.split(":")[0] for p in e.value.problems] == ["rules[0].funcs[0].modelMd5", "rules[1].sub.name"]


def test_names_are_made_native_and_unique():
    raw = edit((("rules", 1, "name"), "boiler"), (("rules", 0, "name"), "锅炉 boiler"),
               (("rules", 1, "funcs", 0, "modelAddress"), "/opt/m.zip"),
               (("mqtts", 1, "broker"), "cloud.example:1883"), (("mqtts", 1, "qos"), 0))
    native = convert(raw)
    assert [r["name"] for r in native["rules"]] == ["boiler-trend", "boiler-anomaly", "boiler-trend-2"]
    assert native["rules"][2]["model"] == "trend-2" and native["models"]["trend-2"]["path"] == "/opt/m.zip"
    assert native["brokers"]["mqtt1"]["url"] == "mqtt://cloud.example:1883"
    assert native["rules"][0]["pub"]["qos"] == 0


@pytest.fixture
def isolated_imports():
    """model.load edits sys.path and sys.modules: undo it."""
    path, modules = list(sys.path), set(sys.modules)
    yield
    sys.path[:] = path
    for name in set(sys.modules) - modules:
        if name.startswith(("pipeline_model_", "helpers")):
            del sys.modules[name]


def old_style_zip(tmp_path: Path) -> bytes:
    """Built like the old zips: one extra top folder, flat index.py, a pickle of a helper package's class."""
    tree = tmp_path / "build" / "trend"
    shutil.copytree(DATA / "old-model", tree, ignore=shutil.ignore_patterns("__pycache__"))
    pickling = "import pickle; from helpers.scaler import Scaler; pickle.dump(Scaler(2, 1), open('scaler.pkl', 'wb'))"
    subprocess.run([sys.executable, "-c", pickling], cwd=tree, check=True)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(tree.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                z.write(path, str(path.relative_to(tree.parent)))
    return out.getvalue()


def test_an_old_style_zip_runs_through_an_old_format_config(tmp_path, isolated_imports):
    archive = old_style_zip(tmp_path)
    files = FileServer()
    raw = copy.deepcopy(old_config())
    for func in (raw["rules"][0]["funcs"][0], raw["rules"][1]["funcs"][0]):
        func["modelAddress"], func["modelMd5"] = files.serve("/group1/M00/trend.zip", archive), digests(archive)[2]
    try:
        spec = convert(raw)["models"]["trend"]
        folder = resolve("trend", ModelSource(url=spec["url"], md5=spec["md5"]), tmp_path / "data", FAST)
    finally:
        files.stop()
    assert folder.name == "trend" and files.hits == ["/group1/M00/trend.zip"]
    loaded = model.load("trend", folder)
    event = {"deviceInfo": {"deviceName": "boiler-1"}, "telemetry": {"ts": 1700000000000, "temp": 21.5}}
    assert matches(convert(raw)["rules"][0]["filter"], event)
    context = model.Context("boiler-trend", "trend", {}, logging.getLogger("trend"))
    assert loaded.handler(event, context) == {"deviceName": "boiler-1", "temp": 44.0, "models": ["scaler"]}
