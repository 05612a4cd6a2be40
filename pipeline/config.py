"""The configuration: a typed, validated value loaded from YAML.

`load(path)` reads the file, expands ${VAR} / ${VAR:-default} in string values, validates with pydantic
(unknown keys are errors) and returns a frozen `Config`. Every problem is reported as
`<file>: <key path>: <message> (got <value>)`, e.g. `conf.yaml: rules[0].pub.topic: ...`.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ByteSize,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from pipeline import topics
from pipeline.errors import ConfigError

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _duration(value: Any) -> Any:
    """'10s', '250ms', '2m', '1h' or a plain number of seconds -> float seconds."""
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", value)
        if not m:
            raise ValueError("expected a duration such as 500ms, 10s, 2m or 1h")
        return float(m.group(1)) * _UNITS[m.group(2) or "s"]
    return value


Seconds = Annotated[float, BeforeValidator(_duration), Field(gt=0)]
Name = Annotated[str, Field(pattern=_NAME)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Broker(_Strict):
    url: str
    username: str | None = None
    password: SecretStr | None = None
    keepalive: int = Field(30, ge=5, le=3600)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if v == "embedded":
            return "embedded://127.0.0.1:1883"
        parts = urlsplit(v)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "embedded") or not parts.hostname:
            raise ValueError("expected mqtt://HOST[:PORT], mqtts://HOST[:PORT], embedded or embedded://HOST:PORT")
        parts.port  # noqa: B018 - raises ValueError on a bad port
        return v

    @property
    def scheme(self) -> str:
        s = urlsplit(self.url).scheme
        return "mqtt" if s == "tcp" else s

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or (8883 if self.scheme == "mqtts" else 1883)

    @property
    def embedded(self) -> bool:
        return self.scheme == "embedded"


class Model(_Strict):
    path: Path
    params: dict[str, Any] = {}

    @field_validator("path")
    @classmethod
    def _exists(cls, v: Path, info: ValidationInfo) -> Path:
        p = v if v.is_absolute() else Path((info.context or {}).get("base", ".")) / v
        p = p.resolve()
        if not p.exists():
            raise ValueError(f"no such file or folder: {p}")
        if p.is_file() and p.suffix != ".zip":
            raise ValueError("a model is a folder or a .zip holding index.py")
        return p


def _known(kind: str, v: str, info: ValidationInfo) -> str:
    known = (info.context or {}).get(kind)
    if known is not None and v not in known:
        names = ", ".join(sorted(known)) or "none"
        raise ValueError(f"no {kind[:-1]} named '{v}' is defined under '{kind}:' (defined: {names})")
    return v


class Sub(_Strict):
    broker: str
    topic: str
    qos: Literal[0, 1] = 1

    _broker = field_validator("broker")(lambda cls, v, info: _known("brokers", v, info))
    _topic = field_validator("topic")(lambda cls, v: topics.check_filter(v))


class Pub(_Strict):
    broker: str
    topic: str
    qos: Literal[0, 1] = 1
    retain: bool = False

    _broker = field_validator("broker")(lambda cls, v, info: _known("brokers", v, info))


class Errors(_Strict):
    topic: str | None = None


class Rule(_Strict):
    name: Name
    sub: Sub
    model: str
    pub: Pub
    workers: int = Field(1, ge=1, le=64)
    timeout: Seconds = 10.0
    errors: Errors = Errors()
    max_attempts: int = Field(3, ge=1, le=100)  # dispatches of one message before it is dead-lettered
    backlog: int = Field(10_000, ge=10)  # messages ingress holds for this rule, not yet given to a worker
    overflow: Literal["drop_new", "drop_old"] = "drop_new"  # QoS 0 only: what goes when the backlog is full
    max_payload_bytes: ByteSize = ByteSize(1 << 20)
    max_rss: ByteSize | None = None  # a worker above this RSS finishes its frame and is replaced

    _model = field_validator("model")(lambda cls, v, info: _known("models", v, info))

    @model_validator(mode="after")
    def _templates(self) -> Rule:
        for at, template in (("pub.topic", self.pub.topic), ("errors.topic", self.errors.topic)):
            if template is None:
                continue
            try:
                topics.check_template(template, self.sub.topic)
            except ValueError as e:
                ctx = {"at": at, "msg": str(e), "value": template}
                raise PydanticCustomError("topic_template", "{msg}", ctx) from e
        return self

    @property
    def error_topic(self) -> str:
        return self.errors.topic or f"pipeline/errors/{self.name}"


class Control(_Strict):
    listen: str = Field("127.0.0.1:5888", pattern=r"^[^:\s]+:\d{1,5}$")


class Outbox(_Strict):
    max_bytes: ByteSize = ByteSize(256 << 20)  # full: egress stops taking results (backpressure), drops nothing
    drain_rate: int = Field(5000, ge=1)  # msg/s cap while catching up after the broker was unreachable


class Endpoints(_Strict):
    transport: Literal["ipc", "tcp"] = "ipc"
    host: str = "127.0.0.1"
    base_port: int = Field(5800, ge=1024, le=65000)


class Config(_Strict):
    name: Name | None = None
    brokers: dict[Name, Broker] = Field(min_length=1)
    models: dict[Name, Model] = Field(min_length=1)
    rules: list[Rule] = Field(min_length=1)
    control: Control = Control()
    endpoints: Endpoints = Endpoints()
    run_dir: Path | None = None
    data_dir: Path | None = None
    outbox: Outbox = Outbox()
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
        return self

    @property
    def instance(self) -> str:
        """Stable name of this stack: used in MQTT client ids and the default run directory."""
        digest = hashlib.sha1(str(self.source).encode()).hexdigest()[:6]
        return self.name or f"{self.source.stem}-{digest}"

    def default_run_dir(self) -> Path:
        return self.run_dir or Path(tempfile.gettempdir()) / f"pipeline-{self.instance}"

    def default_data_dir(self) -> Path:
        """Outbox and model cache: must survive reboots, so not under /tmp."""
        if self.data_dir:
            return self.data_dir if self.data_dir.is_absolute() else self.source.parent / self.data_dir
        env = os.environ.get("PIPELINE_DATA_DIR")
        return Path(env) if env else Path.home() / ".local" / "state" / "pipeline" / self.instance

    def rule(self, name: str) -> Rule:
        for r in self.rules:
            if r.name == name:
                return r
        raise KeyError(f"no rule named '{name}' in {self.source} (rules: {', '.join(r.name for r in self.rules)})")

    def with_workers(self, workers: dict[str, int]) -> Config:
        """This config with some rules' worker counts overridden (`--workers RULE=N`)."""
        rules = [r.model_copy(update={"workers": workers[r.name]}) if r.name in workers else r for r in self.rules]
        return self.model_copy(update={"rules": rules})

    def rule_index(self, name: str) -> int:
        return self.rules.index(self.rule(name))


def load(path: str | os.PathLike[str]) -> Config:
    """Read, expand and validate a configuration file; raise ConfigError naming every problem."""
    source = Path(path).resolve()
    try:
        raw = yaml.safe_load(source.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(source, [f"cannot read the file: {e.strerror}"]) from e
    except yaml.YAMLError as e:
        raise ConfigError(source, [f"not valid YAML: {e}"]) from e
    if not isinstance(raw, dict):
        raise ConfigError(source, ["expected a mapping with brokers:, models: and rules: at the top"])
    problems: list[str] = []
    data = _expand(raw, "", problems)
    if problems:
        raise ConfigError(source, problems)
    return parse(data, source)


def parse(data: dict[str, Any], source: Path) -> Config:
    """Validate an already-parsed mapping as if it had been read from `source`."""
    ctx = {
        "base": source.parent,
        "brokers": set(data.get("brokers") or {}) if isinstance(data.get("brokers"), dict) else None,
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
