"""The old runtime's (pyboot v3) configuration, converted to our native configuration as a plain dict.

The old format, as this module reads it (tests/data/pyboot/old-config.yaml is a full example):

    mqtts:                   # broker connections; qos and retain apply to the rules' sub and pub on them
      - {name: local, broker: tcp://10.0.0.5:1883, qos: 1, retain: false, username: edge, password: secret}
    rules:                   # broker: tcp:// or mqtt:// (plain), ssl://, tls:// or mqtts:// (TLS), or HOST:PORT
      - name: boiler         # sub.name / pub.name: an mqtts name; sub.timeout: seconds for one model call
        sub: {name: local, clientId: boiler-sub, topic: plant/+/telemetry, timeout: 10}
        pub: {name: local, clientId: boiler-pub, topic: plant/boiler/result}
        funcs:
          - name: trend                                # optional, defaults to modelName
            modelName: trend
            modelMd5: pZ4DJ+YhYM9ppHD+VhLi+A==         # base64 of the raw digest (hex accepted); optional
            modelAddress: http://files/group1/M00/00/0F/abc.zip   # or a local path, or per machine
            modelAmd64Address: http://.../a.zip        # (preferred over modelAddress):
            modelArm64Address: http://.../b.zip
            devices:         # none: every message; else a message must match one of the devices
              - deviceName: d1                         # informational; every deviceAttr must hold
                deviceAttr:
                  - {name: deviceName, value: d1, expression: '== data_to_dict["deviceInfo"]["deviceName"]'}
                  - {name: pointName, value: temp, expression: 'in data_to_dict["telemetry"]'}

Converted: each mqtts entry becomes a broker (tcp:// -> mqtt://, ssl:// -> mqtts://); each (rule, func) pair
becomes one native rule named `<rule>-<func>` subscribing the rule's topic (ingress shares one subscription
per topic across rules) with the func's model, `sub.timeout` (seconds for one model call) as its `timeout`,
and the devices as its `filter`. clientId is dropped (client ids are derived per stack); QoS 2 becomes QoS 1
(at least once); every other key is ignored. Names that are not valid native names are rewritten
(other characters become '_', at most 63 characters, '-2', '-3'... on a clash). One modelName with two
different addresses or checksums becomes two models (`name`, `name-2`).

Device filters (`devices[].deviceAttr[]`) are parsed into native filters, never evaluated: see `filters`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipeline.errors import ConfigError
from pipeline.filters import OPS, filter_problems, matches, parse_expression
from pipeline.packages.sources import parse_md5

__all__ = ["OPS", "convert", "filter_problems", "is_pyboot", "matches", "parse_expression"]

_SCHEMES = {"tcp": "mqtt", "mqtt": "mqtt", "ssl": "mqtts", "tls": "mqtts", "mqtts": "mqtts"}


def is_pyboot(raw: Any) -> bool:
    """True for a mapping in the old runtime's format (it has `mqtts:` and no `brokers:`)."""
    return isinstance(raw, dict) and "mqtts" in raw and "brokers" not in raw


def convert(raw: dict[str, Any], source: Path | str = "pyboot.yaml") -> dict[str, Any]:
    """The native configuration (a plain dict) equivalent to an old one; raise ConfigError naming each problem."""
    conv = _Converter()
    conv.brokers(raw.get("mqtts"))
    rules = conv.rules(raw.get("rules"))
    if conv.problems:
        raise ConfigError(source, conv.problems)
    out: dict[str, Any] = {"brokers": conv.native_brokers, "models": conv.models, "rules": rules}
    if isinstance(raw.get("name"), str):
        out = {"name": _safe_name(raw["name"], "pyboot"), **out}
    return out


def _safe_name(text: Any, fallback: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("_.-")[:63]
    return name or fallback


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name[:58]}-{n}"
    taken.add(candidate)
    return candidate


def _broker_url(text: Any) -> str:
    if not isinstance(text, str) or not text.strip():
        raise ValueError("expected tcp://HOST:PORT")
    text = text.strip() if "://" in text else "tcp://" + text.strip()
    parts = urlsplit(text)
    if parts.scheme not in _SCHEMES or not parts.hostname:
        raise ValueError(f"expected tcp://HOST:PORT, mqtt://, ssl:// or mqtts:// (got {text!r})")
    parts.port  # noqa: B018 - raises ValueError on a bad port
    return f"{_SCHEMES[parts.scheme]}://{parts.netloc.rpartition('@')[2]}"


def _model_spec(func: dict[str, Any]) -> dict[str, Any]:
    """An old func's model address(es) and checksum as a native model source; ValueError (with key) if bad."""
    spec: dict[str, Any] = {}
    urls = {a: str(func[k]) for a, k in (("amd64", "modelAmd64Address"), ("arm64", "modelArm64Address")) if func.get(k)}
    address = str(func.get("modelAddress") or "")
    if urls:
        spec["urls"] = urls
    if "://" in address and not address.startswith("file://"):
        spec["url"] = address
    elif address:
        spec["path"] = address.removeprefix("file://")
    bad = [u for u in (*urls.values(), spec.get("url")) if u and urlsplit(u).scheme not in ("http", "https")]
    if not spec or bad:
        raise ValueError(": expected modelAddress (an http(s) url or a path) or modelAmd64Address / "
                         f"modelArm64Address (http(s) urls) (got {bad or 'none'})")
    if func.get("modelMd5"):
        try:
            parse_md5(str(func["modelMd5"]))
        except ValueError as e:
            raise ValueError(f".modelMd5: {e}") from None
        spec["md5"] = str(func["modelMd5"])
    return spec


class _Converter:
    """Collects the native brokers, models and rules of one old config, and every problem on the way."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.native_brokers: dict[str, dict[str, Any]] = {}
        self.links: dict[str, tuple[str, int, bool]] = {}  # old mqtts name -> (broker, qos, retain)
        self.models: dict[str, dict[str, Any]] = {}
        self.rule_names: set[str] = set()

    def brokers(self, mqtts: Any) -> None:
        if not isinstance(mqtts, list) or not mqtts:
            self.problems.append("mqtts: expected a non-empty list of broker connections")
        for i, entry in enumerate(mqtts if isinstance(mqtts, list) else []):
            try:
                self._broker(entry, i)
            except ValueError as e:
                self.problems.append(f"mqtts[{i}]{e}")

    def _broker(self, entry: Any, i: int) -> None:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str | int):
            raise ValueError(": expected a mapping with name: and broker:")
        if str(entry["name"]) in self.links:
            raise ValueError(f".name: duplicate connection name {entry['name']!r}")
        qos = entry.get("qos", 1)
        if qos not in (0, 1, 2) or isinstance(qos, bool):
            raise ValueError(f".qos: expected 0, 1 or 2 (got {qos!r})")
        try:
            broker = {"url": _broker_url(entry.get("broker"))}
        except ValueError as e:
            raise ValueError(f".broker: {e}") from None
        broker.update({k: str(entry[k]) for k in ("username", "password") if entry.get(k) not in (None, "")})
        name = _unique(_safe_name(entry["name"], f"mqtt{i}"), set(self.native_brokers))
        self.native_brokers[name] = broker
        self.links[str(entry["name"])] = (name, min(qos, 1), entry.get("retain") is True)

    def rules(self, rules: Any) -> list[dict[str, Any]]:
        if not isinstance(rules, list) or not rules:
            self.problems.append("rules: expected a non-empty list")
            return []
        return [native for i, rule in enumerate(rules) for native in self._rule(rule, f"rules[{i}]", i)]

    def _rule(self, rule: Any, at: str, i: int) -> list[dict[str, Any]]:
        if not isinstance(rule, dict) or not isinstance(rule.get("funcs"), list) or not rule["funcs"]:
            self.problems.append(f"{at}: expected a mapping with name:, sub:, pub: and a non-empty list funcs:")
            return []
        rname = _safe_name(rule.get("name", ""), f"rule{i}")
        sub, pub = self._end(rule.get("sub"), f"{at}.sub"), self._end(rule.get("pub"), f"{at}.pub")
        timeout = self._timeout(rule["sub"], f"{at}.sub.timeout") if sub else {}
        out = []
        for j, func in enumerate(rule["funcs"]):
            made = self._func(func, f"{at}.funcs[{j}]", str(rule.get("name", rname)))
            if made and sub and pub:
                fname, model, filter = made
                name = _unique(f"{rname}-{fname}"[:63], self.rule_names)
                sub_ = {k: sub[k] for k in ("broker", "topic", "qos")}
                out.append({"name": name, "sub": sub_, "model": model, "pub": dict(pub), **timeout, **filter})
        return out

    def _end(self, end: Any, at: str) -> dict[str, Any] | None:
        """A sub: or pub: of an old rule -> broker, topic, qos, retain."""
        if not isinstance(end, dict) or not isinstance(end.get("topic"), str) or not end["topic"]:
            self.problems.append(f"{at}: expected a mapping with name: (an mqtts entry) and topic:")
            return None
        link = self.links.get(str(end.get("name")))
        if link is None:
            known = ", ".join(sorted(self.links)) or "none"
            self.problems.append(f"{at}.name: no mqtts entry named {end.get('name')!r} (defined: {known})")
            return None
        return {"broker": link[0], "topic": end["topic"], "qos": link[1], "retain": link[2]}

    def _timeout(self, sub: dict[str, Any], at: str) -> dict[str, Any]:
        timeout = sub.get("timeout")
        if timeout is None:
            return {}
        if isinstance(timeout, bool) or not isinstance(timeout, int | float | str) or timeout in (0, ""):
            self.problems.append(f"{at}: expected seconds, a positive number (got {timeout!r})")
            return {}
        return {"timeout": timeout}

    def _func(self, func: Any, at: str, rule: str) -> tuple[str, str, dict[str, Any]] | None:
        if not isinstance(func, dict) or not isinstance(func.get("modelName"), str | int):
            self.problems.append(f"{at}.modelName: required (the model this func runs)")
            return None
        fname = _safe_name(func.get("name") or func["modelName"], "func")
        model = self._model(func, at)
        filter = self._devices(func.get("devices"), at, f"rule {rule!r}, func {fname!r}")
        if model is None or filter is None:
            return None
        return fname, model, ({"filter": filter} if filter else {})

    def _model(self, func: dict[str, Any], at: str) -> str | None:
        """The native model a func runs: one per distinct (modelName, source, checksum)."""
        try:
            spec = _model_spec(func)
        except ValueError as e:
            self.problems.append(f"{at}{e}")
            return None
        base = _safe_name(func["modelName"], "model")
        for name, known in self.models.items():
            if known == spec and (name == base or name.startswith(f"{base[:58]}-")):
                return name
        name = _unique(base, set(self.models))
        self.models[name] = spec
        return name

    def _devices(self, devices: Any, at: str, who: str) -> dict[str, Any] | None:
        """The devices of a func as a native filter ({} for none); None when one is invalid."""
        if devices in (None, []):
            return {}
        if not isinstance(devices, list):
            self.problems.append(f"{at}.devices: expected a list")
            return None
        alternatives = [self._device(device, f"{at}.devices[{k}]", who) for k, device in enumerate(devices)]
        if any(a is None for a in alternatives):
            return None
        return alternatives[0] if len(alternatives) == 1 else {"any": alternatives}

    def _device(self, device: Any, at: str, who: str) -> dict[str, Any] | None:
        attrs = device.get("deviceAttr") if isinstance(device, dict) else None
        if not isinstance(attrs, list):
            self.problems.append(f"{at}.deviceAttr: expected a list of {{value, expression}}")
            return None
        conditions, before = [], len(self.problems)
        for m, attr in enumerate(attrs):
            try:
                if not isinstance(attr, dict) or "value" not in attr:
                    raise ValueError("expected a mapping with value: and expression:")
                conditions.append(parse_expression(attr.get("expression"), attr["value"]))
            except ValueError as e:
                self.problems.append(f"{at}.deviceAttr[{m}]: {who}: {e}")
        return {"all": conditions} if len(self.problems) == before else None
