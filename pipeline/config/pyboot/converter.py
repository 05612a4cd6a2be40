"""One old file read into native brokers, models and rules (the shapes and their meaning: pipeline.config.pyboot).

Invariants: every problem names its key path in the old file and the offending text, and all of them are
reported at once; nothing is evaluated; the native rule of old rule i and func j is named `r<i>-f<j>[-<model>]`
(indexes from 0, as in the key paths), so names are unique and valid whatever the model names are.
"""

from __future__ import annotations

import copy
import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipeline import topics
from pipeline.config.pyboot import devices
from pipeline.config.pyboot.keys import FUNC, MQTT, PUB, RULE, SUB, TOP, Report, scan, telling, versions
from pipeline.config.schema.common import duration
from pipeline.models.packages.sources import parse_md5

SKIP_RESULTS = ["{}", "null"]  # results the old runtime did not publish (None is never published)
DEFAULT_TIMEOUT = "10s"  # pub.timeout when missing
EMPTY_MD5 = "d41d8cd98f00b204e9800998ecf8427e"  # the MD5 of zero bytes: a placeholder, never a model's
_SCHEMES = {"tcp": "mqtt", "mqtt": "mqtt", "ssl": "mqtts", "tls": "mqtts", "mqtts": "mqtts"}
_ADDRESSES = {  # version -> (key of one address for every machine, per-machine keys, checksum key)
    1: ("model_address", {}, "model_md5"),
    2: ("model_address", {}, "model_md5"),
    3: ("modelAddress", {"amd64": "modelAmd64Address", "arm64": "modelArm64Address"}, "modelMd5"),
}


@dataclass(frozen=True)
class Link:
    """An `mqtts` entry: the native broker it became, and the qos and retain of everything on it."""

    broker: str
    qos: int
    retain: bool


@dataclass(frozen=True)
class Func:
    """A top-level func as read: its index, native model and filter, and its model's name for rule names."""

    index: int
    model: str
    filter: dict[str, Any]
    label: str


@dataclass(frozen=True)
class OldRule:
    """An unnamed old rule as read: its index, its subscription and its publication as native sections."""

    index: int
    sub: dict[str, Any]
    pub: dict[str, Any]
    timeout: Any


def safe_name(text: Any, fallback: str) -> str:
    """`text` as a valid native name (other characters become '_', 63 at most), or `fallback` when nothing of
    it is left (a name in Chinese)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("_.-")[:63].rstrip("_.-")
    return name or fallback


def broker_url(text: Any) -> str:
    """An old `broker` (tcp://HOST:PORT, ssl://..., or HOST:PORT) as a native url; ValueError if it is none."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"expected tcp://HOST:PORT (got {text!r:.200})")
    text = text.strip() if "://" in text else "tcp://" + text.strip()
    parts = urlsplit(text)
    if parts.scheme not in _SCHEMES or not parts.hostname:
        raise ValueError(f"expected tcp://HOST:PORT, mqtt://, ssl:// or mqtts:// (got {text!r:.200})")
    if parts.port is None and parts.netloc.endswith(":"):
        raise ValueError(f"expected a port after ':' (got {text!r:.200})")
    _ = parts.port  # ValueError when out of range
    return f"{_SCHEMES[parts.scheme]}://{parts.netloc.rpartition('@')[2]}"


class Converter:
    """Reads one old file; collects the native brokers, models and rules, and every problem, ignored key and
    warning on the way (`report`)."""

    def __init__(self, *, source: Path) -> None:
        self.source = source
        self.report = Report()
        self.version = ""
        self.links: dict[str, Link] = {}
        self.used: set[str] = set()
        self.brokers: dict[str, dict[str, Any]] = {}
        self.models: dict[str, dict[str, Any]] = {}

    def convert(self, raw: dict[str, Any]) -> dict[str, Any]:
        """The native brokers, models and rules (the problems, when any, are in `report`)."""
        scan(raw, TOP, "", self.report)
        for i, entry in enumerate(self._list(raw, "mqtts", "broker connections")):
            self._mqtt(entry, i)
        funcs = self._funcs(self._list(raw, "funcs", "models (each rule runs every func)"))
        rules = [r for i, rule in enumerate(self._list(raw, "rules", "rules")) if (r := self._rule(rule, i))]
        native = [self._native_rule(rule, func) for rule in rules for func in funcs]
        for old in [name for name in self.links if name not in self.used]:
            self.report.ignored[f"mqtts entry {old!r} (no rule names it)"] = None
        used = {link.broker for old, link in self.links.items() if old in self.used}
        return {"brokers": {k: v for k, v in self.brokers.items() if k in used}, "models": self.models,
                "rules": native}

    def _list(self, raw: dict[str, Any], key: str, what: str) -> list[Any]:
        value = raw.get(key)
        if not isinstance(value, list) or not value:
            self.report.problems.append(f"{key}: expected a non-empty list of {what} (got {value!r:.200})")
            return []
        return value

    # -- mqtts --

    def _mqtt(self, entry: Any, i: int) -> None:
        at = f"mqtts[{i}]"
        if isinstance(entry, dict):
            scan(entry, MQTT, at, self.report)
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str | int):
            shown = {**entry, "password": "***"} if isinstance(entry, dict) and "password" in entry else entry
            self.report.problems.append(f"{at}: expected a mapping with name:, broker:, qos:, retain: "
                                        f"(got {shown!r:.200})")
            return
        name = str(entry["name"])
        if name in self.links:
            self.report.problems.append(f"{at}.name: duplicate connection name {name!r}")
            return
        qos, retain = entry.get("qos", 0), entry.get("retain", False)
        if qos not in (0, 1, 2) or isinstance(qos, bool):
            self.report.problems.append(f"{at}.qos: expected 0, 1 or 2 (got {qos!r:.200})")
        if not isinstance(retain, bool):
            self.report.problems.append(f"{at}.retain: expected true or false (got {retain!r:.200})")
        try:
            broker = {"url": broker_url(entry.get("broker"))}
        except ValueError as e:
            self.report.problems.append(f"{at}.broker: {e}")
            return
        if qos == 2:
            self.report.warnings.append(f"{at}.qos: 2 becomes 1 here (at least once: a message may come twice)")
        broker.update({k: str(entry[k]) for k in ("username", "password") if entry.get(k) not in (None, "")})
        native = safe_name(name, f"mqtt{i}")
        while native in self.brokers:
            native = f"{native[:58]}-{i}"
        self.brokers[native] = broker
        self.links[name] = Link(broker=native, qos=min(qos, 1) if qos in (0, 1, 2) else 0, retain=retain is True)

    # -- funcs --

    def _funcs(self, funcs: list[Any]) -> list[Func]:
        kinds: dict[int, frozenset[int]] = {}
        for j, func in enumerate(funcs):
            if not isinstance(func, dict):
                self.report.problems.append(f"funcs[{j}]: expected a mapping with modelName: and a model address "
                                            f"(got {func!r:.200})")
                continue
            try:
                kinds[j] = versions(func)
            except ValueError as e:
                self.report.problems.append(f"funcs[{j}]: {e}")
        common = frozenset.intersection(*kinds.values()) if kinds else frozenset()
        if kinds and not common:
            shapes = "; ".join(f"funcs[{j}] has {', '.join(telling(funcs[j]))}" for j in kinds)
            self.report.problems.append(f"funcs: the funcs mix the shapes of two versions of the old format: {shapes}")
            return []
        version = max(common, default=3)
        self.version = " or ".join(str(v) for v in sorted(common)) if kinds else ""
        out = [self._func(funcs[j], j, version) for j in kinds]
        if version == 1:
            self._overlap([(f.index, f.filter) for f in out if f and "all" in f.filter], "funcs", "funcs",
                          "the old runtime published only the last one's result (it ran every func of a rule in one "
                          "unit), here each one's is published")
        return [f for f in out if f is not None]

    def _func(self, func: dict[str, Any], j: int, version: int) -> Func | None:
        at = f"funcs[{j}]"
        scan(func, FUNC, at, self.report)
        before = len(self.report.problems)
        name = func.get("modelName")
        if not isinstance(name, str | int) or name == "":
            self.report.problems.append(f"{at}.modelName: required, the model's name (got {name!r:.200})")
        model = self._model(func, at, version, safe_name(name, f"func{j}"))
        selected = devices.selection(func, version, at, self.report)
        if len(self.report.problems) > before or model is None:
            return None
        if not selected:
            self.report.warnings.append(
                f"{at}: no devices: like the old runtime, its rules process no message (their filter matches "
                "nothing); give it devices to run it")
        if version > 1:
            key = "device" if version == 2 else "devices"
            self._overlap(list(enumerate(selected)), f"{at}.{key}", key, "the old runtime ran such a message "
                          "through the model once per device, here once")
        return Func(index=j, model=model, filter=devices.as_filter(selected), label=safe_name(name, ""))

    def _overlap(self, indexed: list[tuple[int, dict[str, Any]]], at: str, key: str, then: str) -> None:
        """Warn about the pairs of devices (index in the file, device filter) one message can match both of."""
        pairs = devices.overlapping([device for _, device in indexed])
        for a, b in pairs[:3]:
            self.report.warnings.append(f"{at}[{indexed[a][0]}] and {key}[{indexed[b][0]}] can both match one "
                                        f"message: {then}")
        if len(pairs) > 3:
            self.report.warnings.append(f"{at}: {len(pairs) - 3} more such pairs")

    def _model(self, func: dict[str, Any], at: str, version: int, base: str) -> str | None:
        """The native model a func runs: one per distinct source and checksum."""
        spec = self._source(func, at, version)
        if spec is None:
            return None
        for name, known in self.models.items():
            if known == spec and (name == base or name.startswith(f"{base[:58]}-")):
                return name
        name, n = base, 1
        while name in self.models:
            n += 1
            name = f"{base[:58]}-{n}"
        self.models[name] = spec
        return name

    def _source(self, func: dict[str, Any], at: str, version: int) -> dict[str, Any] | None:
        one, per_machine, md5_key = _ADDRESSES[version]
        spec: dict[str, Any] = {}
        urls = {arch: func[key] for arch, key in per_machine.items() if func.get(key) not in (None, "")}
        for arch, key in per_machine.items():
            if arch in urls and not _is_http(urls[arch]):
                self.report.problems.append(f"{at}.{key}: expected an http:// or https:// url "
                                            f"(got {urls[arch]!r:.200})")
        if urls:
            spec["urls"] = urls
        address = func.get(one)
        if address not in (None, ""):
            spec.update(self._address(address, f"{at}.{one}"))
        if not spec:
            keys = " / ".join([one, *per_machine.values()])
            if not telling(func):  # nothing says which version: name them all
                v3 = " / ".join([_ADDRESSES[3][0], *_ADDRESSES[3][1].values()])
                keys = f"model_address (versions 1 and 2) or {v3}"
            self.report.problems.append(f"{at}: no model address: expected {keys}")
            return None
        md5 = func.get(md5_key)
        if md5 not in (None, ""):
            spec["md5"] = self._md5(md5, f"{at}.{md5_key}", len(urls) > 1)
        if "path" not in spec:
            self._integrity(spec, at, md5_key, [(key, urls[arch]) for arch, key in per_machine.items() if arch in urls]
                            + ([(one, spec["url"])] if "url" in spec else []))
        return spec

    def _integrity(self, spec: dict[str, Any], at: str, md5_key: str, urls: list[tuple[str, Any]]) -> None:
        """A url model keeps working as the old runtime fetched it: over plain http and without a checksum it is
        converted with `insecure: true`, with a warning saying how to protect it."""
        for key, url in urls:
            if urlsplit(str(url).strip()).scheme == "http":
                self.report.warnings.append(f"{at}.{key}: plain http: converted with insecure: true so that it is "
                                            "fetched as before; serve it over https")
                spec["insecure"] = True
                break
        if "md5" not in spec:
            self.report.warnings.append(
                f"{at}: no {md5_key}: converted with insecure: true, the model is fetched unchecked as before; add "
                f"{md5_key} (the archive's: openssl md5 -binary ARCHIVE | base64), or convert the file and give sha256")
            spec["insecure"] = True

    def _address(self, address: Any, at: str) -> dict[str, Any]:
        """A model address as a native source: an http(s) url, or a local file:// url or absolute path (the
        old runtime downloaded only over http: an address without a scheme is taken as a missing http://)."""
        text = str(address).strip()
        if _is_http(text):
            return {"url": text}
        path = Path(text.removeprefix("file://"))
        try:
            found = path.is_absolute() and path.exists()
        except (OSError, ValueError):  # a NUL byte, a name too long
            found = False
        if not found:
            self.report.problems.append(f"{at}: expected an http(s) url, or a file:// url or absolute path of an "
                                        f"existing file (got {text!r:.200})")
            return {}
        return {"path": str(path)}

    def _md5(self, md5: Any, at: str, per_machine: bool) -> str:
        text = str(md5)
        try:
            digest = parse_md5(text)
        except ValueError as e:
            self.report.problems.append(f"{at}: {e}")
            return text
        self.report.warnings.append(f"{at}: md5 is weak (archives with the same MD5 can be made): convert the file "
                                    "and give sha256")
        if digest == EMPTY_MD5:
            self.report.warnings.append(f"{at}: {text} is the MD5 of an empty file, not of any model archive: the "
                                        "model will be refused when fetched (the old runtime never checked it)")
        if per_machine:
            self.report.warnings.append(f"{at}: one checksum for two archives (amd64 and arm64): it is checked "
                                        "against the one this machine downloads (the old runtime never checked it)")
        return text

    # -- rules --

    def _rule(self, rule: Any, i: int) -> OldRule | None:
        at = f"rules[{i}]"
        if not isinstance(rule, dict):
            self.report.problems.append(f"{at}: expected a mapping with sub: and pub: (got {rule!r:.200})")
            return None
        if "funcs" in rule:
            self.report.problems.append(f"{at}.funcs: funcs belong at the top level of the file (every rule runs "
                                        "every func); no version of the old format nests them in a rule")
            return None
        scan(rule, RULE, at, self.report)
        sub = self._end(rule.get("sub"), f"{at}.sub", SUB)
        pub = self._end(rule.get("pub"), f"{at}.pub", PUB)
        timeout = self._timeout(rule.get("pub"), f"{at}.pub.timeout")
        if sub is None or pub is None or timeout is None:
            return None
        if "{" in pub["topic"] or "}" in pub["topic"]:
            self.report.problems.append(f"{at}.pub.topic: braces are {{N}} placeholders here, and the old runtime "
                                        f"published the topic as written: rename it (got {pub['topic']!r:.200})")
            return None
        try:
            topics.check_filter(sub["topic"])
            topics.check_template(pub["topic"], sub["topic"])
        except ValueError as e:
            self.report.problems.append(f"{at}: {e} (sub.topic {sub['topic']!r}, pub.topic {pub['topic']!r})")
            return None
        sub.pop("retain")
        return OldRule(index=i, sub=sub, pub=pub, timeout=timeout)

    def _end(self, end: Any, at: str, known: tuple[str, ...]) -> dict[str, Any] | None:
        """A rule's sub: or pub: -> native broker, topic, qos, retain."""
        if isinstance(end, dict):
            scan(end, known, at, self.report)
        if not isinstance(end, dict) or not isinstance(end.get("topic"), str) or not end["topic"]:
            self.report.problems.append(f"{at}: expected a mapping with name: (an mqtts entry) and topic: "
                                        f"(got {end!r:.200})")
            return None
        name = str(end.get("name"))
        link = self.links.get(name)
        if link is None:
            defined = ", ".join(repr(n) for n in self.links) or "none"
            like = difflib.get_close_matches(name, list(self.links), n=1)
            hint = f"; did you mean {like[0]!r}?" if like else ""
            self.report.problems.append(f"{at}.name: no mqtts entry is named {end.get('name')!r} (defined: "
                                        f"{defined}){hint}")
            return None
        self.used.add(name)
        if "clientId" in end:
            self.report.ignored["clientId (MQTT client ids are derived per stack)"] = None
        return {"broker": link.broker, "topic": end["topic"], "qos": link.qos, "retain": link.retain}

    def _timeout(self, pub: Any, at: str) -> Any:
        """pub.timeout as the model-call timeout; one the old runtime would have carried without reading it
        (zero, negative, infinite, not a duration) is the default, with a warning."""
        value = pub.get("timeout", DEFAULT_TIMEOUT) if isinstance(pub, dict) else DEFAULT_TIMEOUT
        try:
            seconds = duration(value)
            if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 < seconds < 1e9:
                raise ValueError("expected a positive duration")
        except ValueError:
            self.report.warnings.append(f"{at}: {value!r:.80} is not a duration this runtime can enforce (the old "
                                        f"runtime never read it): the timeout is {DEFAULT_TIMEOUT}")
            return DEFAULT_TIMEOUT
        return value

    def _native_rule(self, rule: OldRule, func: Func) -> dict[str, Any]:
        name = f"r{rule.index}-f{func.index}" + (f"-{func.label}" if func.label else "")
        return {"name": name[:63].rstrip("_.-"), "sub": dict(rule.sub), "model": func.model, "pub": dict(rule.pub),
                "timeout": rule.timeout, "filter": copy.deepcopy(func.filter), "skip_results": list(SKIP_RESULTS)}


def _is_http(text: Any) -> bool:
    try:
        parts = urlsplit(str(text).strip())
        return parts.scheme in ("http", "https") and bool(parts.hostname) and (parts.port or 1) > 0
    except ValueError:  # a bad IPv6 literal, a port out of range
        return False
