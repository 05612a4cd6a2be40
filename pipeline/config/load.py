"""The configuration: a typed, validated value loaded from YAML.

`load(path)` reads the file, expands ${VAR} / ${VAR:-default} in string values, validates with pydantic
(unknown keys are errors) and returns a frozen `Config`. Every problem is reported as
`<file>: <key path>: <message> (got <value>)`, e.g. `conf.yaml: rules[0].pub.topic: ...`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    Field,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from pipeline.config import pyboot
from pipeline.config.schema.behaviour import ConfigMixin
from pipeline.config.schema.common import Name, Strict
from pipeline.config.schema.rules import (
    Canary,
    Control,
    ControlTls,
    Endpoints,
    Errors,
    Outbox,
    Pub,
    Rule,
    Shadow,
    State,
    Sub,
)
from pipeline.config.schema.sources import Broker, Model, Packages
from pipeline.errors import ConfigError

__all__ = ["Broker", "Canary", "Config", "Control", "ControlTls", "Endpoints", "Errors", "Loaded", "Model", "Outbox",
           "Packages", "Pub", "Rule", "Shadow", "State", "Sub", "load", "load_file", "parse"]

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class Config(ConfigMixin, Strict):  # instance, default_run_dir(), rule(), with_workers()...
    """A validated configuration file: brokers, models, rules, control, outbox, endpoints. Immutable; its
    secrets are `SecretStr`s."""

    name: Name | None = None
    brokers: dict[Name, Broker] = Field(min_length=1)
    models: dict[Name, Model] = Field(min_length=1)
    rules: list[Rule] = Field(min_length=1)
    control: Control = Control()
    endpoints: Endpoints = Endpoints()
    run_dir: Path | None = None
    data_dir: Path | None = None
    outbox: Outbox = Outbox()
    packages: Packages = Packages()
    source: Path = Path("pipeline.yaml")

    @model_validator(mode="after")
    def _unique_rules(self) -> Config:
        seen: set[str] = set()
        for i, rule in enumerate(self.rules):
            if rule.name in seen:
                raise PydanticCustomError(
                    "duplicate", "duplicate rule name '{name}'", {"at": f"rules[{i}].name", "name": rule.name}
                )
            seen.add(rule.name)
        if not any(r.trial for r in self.rules):  # the companions of shadows and canaries, once
            object.__setattr__(self, "rules", [*self.rules, *(t for r in self.rules for t in r.trials())])
        return self


def read_yaml(source: Path) -> Any:
    """The parsed YAML of a file; ConfigError naming the file when it cannot be read or parsed."""
    try:
        return yaml.safe_load(source.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(source, [f"cannot read the file: {e.strerror}"]) from e
    except UnicodeDecodeError as e:
        raise ConfigError(source, [f"not UTF-8 text: {e.reason} at byte {e.start}"]) from e
    except yaml.YAMLError as e:
        raise ConfigError(source, [f"not valid YAML: {e}"]) from e
    except RecursionError:
        raise ConfigError(source, ["not a configuration: nested too deeply"]) from None


@dataclass(frozen=True, kw_only=True)
class Loaded:
    """A configuration file as loaded: the validated config, and for a file in the old runtime's format what
    its conversion ignored and where it behaves differently than before."""

    config: Config
    conversion: pyboot.Conversion | None


def load(path: str | os.PathLike[str]) -> Config:
    """Read, expand and validate a configuration file; raise ConfigError naming every problem."""
    return load_file(path).config


def load_file(path: str | os.PathLike[str]) -> Loaded:
    """`load`, keeping the conversion of an old-format file (pipeline.config.pyboot) for those who report it."""
    source = Path(path).resolve()
    raw = read_yaml(source)
    if not isinstance(raw, dict):
        raise ConfigError(source, ["expected a mapping with brokers:, models: and rules: at the top"])
    conversion = pyboot.convert(raw, source) if pyboot.is_pyboot(raw) else None
    problems: list[str] = []
    try:  # ${VAR}s: in a native file, and in the native sections added to an old one (the old runtime had none)
        if conversion is None:
            data = _expand(raw, "", problems)
        else:
            data = {k: _expand(v, k, problems) if k in pyboot.NATIVE else v for k, v in conversion.native.items()}
    except RecursionError:  # a YAML alias that holds itself
        raise ConfigError(source, ["not a configuration: nested too deeply, or a YAML alias that holds itself"]) \
            from None
    if problems:
        raise ConfigError(source, problems)
    return Loaded(config=parse(data, source), conversion=conversion)


def parse(data: dict[str, Any], source: Path) -> Config:
    """Validate an already-parsed mapping as if it had been read from `source`."""
    ctx = {
        "base": source.parent,
        "brokers": set(data.get("brokers") or {}) if isinstance(data.get("brokers"), dict) else None,
        "protocols": Broker.protocols(data.get("brokers")),
        "models": set(data.get("models") or {}) if isinstance(data.get("models"), dict) else None,
    }
    try:
        return Config.model_validate({**data, "source": source}, context=ctx)
    except ValidationError as e:
        raise ConfigError(source, [_describe(err) for err in e.errors()]) from None


def _expand(node: Any, at: str, problems: list[str]) -> Any:
    if isinstance(node, dict):
        return {k: _expand(v, f"{at}.{k}" if at else str(k), problems) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand(v, f"{at}[{i}]", problems) for i, v in enumerate(node)]
    if not isinstance(node, str) or "${" not in node:
        return node

    def sub(m: re.Match[str]) -> str:
        value = os.environ.get(m.group(1))
        if m.group(2) is not None and not value:  # like the shell: ${VAR:-default} also when VAR is empty
            value = m.group(2)
        if value is None:
            problems.append(f"{at}: environment variable {m.group(1)} is not set (write ${{{m.group(1)}:-default}})")
            return ""
        return value

    return _ENV.sub(sub, node)


def _describe(err: Any) -> str:
    path = ""
    for part in err["loc"]:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    ctx = err.get("ctx") or {}
    if "at" in ctx:
        path = f"{path}.{ctx['at']}" if path else ctx["at"]
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
        return f"{path}: {msg}"
    if err["type"] == "missing":
        return f"{path}: required key is missing"
    value = ctx.get("value", err.get("input"))
    if isinstance(value, dict | list) or "password" in path:  # never echo a secret
        return f"{path}: {msg}"
    return f"{path}: {msg} (got {value!r})"
