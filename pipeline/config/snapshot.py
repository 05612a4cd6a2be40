"""The validated configuration without pydantic, for the stages of a stack: pydantic never loads in them.

`pipeline up` validates the file (pipeline.config.load, pydantic) and `write()`s the result to `<run dir>/config.json`
under a fresh run id, which it puts in the environment ($PIPELINE_RUN) that supervisord and so every stage
inherit. A stage `read()`s the file when it names that run and the same config file; otherwise (a stage started
by another supervisord) it validates the file itself. A hot reload `rewrite()`s it with the models it loaded.
The classes here have the attributes of pipeline.config.load's, as validated, and the same properties and methods:
both take them from the mixins of pipeline.config.schema.behaviour, plus `model_dump()` and `model_copy()`.

Secrets (broker passwords, the control token) never appear in the file: it holds their places only. Their
values travel in the environment ($PIPELINE_SECRETS, a JSON list) of the processes that talk to brokers or
serve control; `pipeline up` starts the workers and the embedded broker without it and without the variables
the file's `brokers:` and `control:` sections name (`withheld_variables`), so a model's code finds no secret
in its process. A stage without $PIPELINE_SECRETS gets `Withheld` in their place.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from pipeline.config.schema.behaviour import BrokerMixin, ConfigMixin, ModelMixin, PackagesMixin, RuleMixin
from pipeline.supervision import run_dir as rundir

FILE = rundir.CONFIG_FILE
RUN = "PIPELINE_RUN"  # the run id naming this `pipeline up`'s config.json: every stage has it
SECRETS = "PIPELINE_SECRETS"  # the secrets' values, a JSON list: only the stages that need them have it
FORMAT = 2
SECRET_SECTIONS = ("brokers", "control", "mqtts")  # where a file's secrets are written (mqtts: the old runtime's)
_REFS = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")  # the variables pipeline.config.load._ENV expands


# -- plain values --

class Secret:
    """pydantic's SecretStr as far as the stages use it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get_secret_value(self) -> str:
        return self._value

    def __eq__(self, other: object) -> bool:
        get = getattr(other, "get_secret_value", None)
        return get is not None and get() == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return "Secret('**********')"

    def __str__(self) -> str:
        return "**********"


class Withheld:
    """A secret this process was not given (a worker): it has no use for it, and reading it is an error."""

    __slots__ = ()

    def get_secret_value(self) -> str:
        from pipeline.errors import PipelineError

        raise PipelineError("this process was started without the stack's secrets (a worker has no use for them)")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Withheld)

    def __hash__(self) -> int:
        return hash(Withheld)

    def __repr__(self) -> str:
        return "Withheld()"


class Value:
    """A frozen record: the fields of a validated section as attributes."""

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen")

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.__dict__ == self.__dict__

    def __hash__(self) -> int:
        return hash((type(self), *self.__dict__.values()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.__dict__.items())})"

    def model_dump(self, *, exclude: set[str] | None = None) -> dict[str, Any]:
        return {k: _dump(v) for k, v in self.__dict__.items() if not exclude or k not in exclude}

    def model_copy(self, *, update: dict[str, Any] | None = None) -> Any:
        return type(self)(**{**self.__dict__, **(update or {})})


def _dump(v: Any) -> Any:
    if isinstance(v, Value) or hasattr(type(v), "model_fields"):  # pydantic's: a reload puts new models in a Config
        return v.model_dump()
    if isinstance(v, dict):
        return {k: _dump(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return type(v)(_dump(x) for x in v)
    return v


class Sub(Value):
    """`rules[].sub`, as `pipeline up` validated it."""


class Pub(Value):
    """`rules[].pub`, as `pipeline up` validated it."""


class Errors(Value):
    """`rules[].errors`, as `pipeline up` validated it."""


class State(Value):
    """`rules[].state`, as `pipeline up` validated it."""


class Shadow(Value):
    """`rules[].shadow`, as `pipeline up` validated it."""


class Canary(Value):
    """`rules[].canary`, as `pipeline up` validated it."""


class Control(Value):
    """`control`, as `pipeline up` validated it."""


class ControlTls(Value):
    """`control.tls`, as `pipeline up` validated it."""


class Outbox(Value):
    """`outbox`, as `pipeline up` validated it."""


class Endpoints(Value):
    """`endpoints`, as `pipeline up` validated it."""


class Remote(Value):
    """`endpoints.remote`, as `pipeline up` validated it."""


class Rule(RuleMixin, Value):
    """One of `rules`, as `pipeline up` validated it."""


class Broker(BrokerMixin, Value):
    """One of `brokers`, as `pipeline up` validated it."""


class Model(ModelMixin, Value):
    """One of `models`, as `pipeline up` validated it."""


class Packages(PackagesMixin, Value):
    """`packages`, as `pipeline up` validated it."""


class Config(ConfigMixin, Value):
    """The whole configuration, as `pipeline up` validated it."""


_CLASSES = {c.__name__: c for c in (Sub, Pub, Errors, State, Shadow, Canary, Control, ControlTls, Outbox, Endpoints,
                                    Remote, Rule, Broker, Model, Packages, Config)}


# -- the file --

def _encode(v: Any, secrets: list[str]) -> Any:
    """JSON for a validated value; secrets are appended to `secrets` and written as their index there."""
    fields = getattr(type(v), "model_fields", None)
    if fields is not None and type(v).__name__ in _CLASSES:  # a pydantic model of pipeline.config.load
        return {"__class__": type(v).__name__, **{k: _encode(getattr(v, k), secrets) for k in fields}}
    if isinstance(v, Value):  # a config read here, written again by a reload
        return {"__class__": type(v).__name__, **{k: _encode(x, secrets) for k, x in v.__dict__.items()}}
    if isinstance(v, Path):
        return {"__path__": str(v)}
    if hasattr(v, "get_secret_value"):
        secrets.append(v.get_secret_value())
        return {"__secret__": len(secrets) - 1}
    if isinstance(v, dict):
        if not all(isinstance(k, str) for k in v):
            raise TypeError("a mapping with keys that are not strings")
        return {"__dict__": {k: _encode(x, secrets) for k, x in v.items()}}
    if isinstance(v, list):
        return [_encode(x, secrets) for x in v]
    if v is None or isinstance(v, bool | int | float | str):
        return int(v) if type(v) not in (bool, int, float, str) and isinstance(v, int) else v  # ByteSize -> int
    raise TypeError(f"cannot write a {type(v).__name__}")


def _decode(v: Any, secrets: list[str] | None) -> Any:
    if isinstance(v, list):
        return [_decode(x, secrets) for x in v]
    if not isinstance(v, dict):
        return v
    if "__path__" in v:
        return Path(v["__path__"])
    if "__secret__" in v:
        return Withheld() if secrets is None else Secret(secrets[v["__secret__"]])
    if "__dict__" in v:
        return {k: _decode(x, secrets) for k, x in v["__dict__"].items()}
    fields = dict(v)
    return _CLASSES[fields.pop("__class__")](**{k: _decode(x, secrets) for k, x in fields.items()})


def write(run_dir: Path, cfg: Any, run: str) -> list[str] | None:
    """Write the validated `cfg` for the stages of the run `run`; return the values of its secrets (for the
    environment of the stages that need them), or None (and no file) when it cannot be written faithfully:
    then every stage validates the file itself."""
    (run_dir / FILE).unlink(missing_ok=True)
    secrets: list[str] = []
    try:
        body = {"format": FORMAT, "run": run, "source": str(cfg.source), "config": _encode(cfg, secrets)}
        body["secrets"] = len(secrets)
        text = json.dumps(body, allow_nan=False)
        back = _decode(json.loads(text)["config"], secrets)
    except (TypeError, ValueError):
        return None
    if back.model_dump() != cfg.model_dump():
        return None  # e.g. a YAML date in a filter
    rundir.write_private(run_dir / FILE, text)
    return secrets


def _given_secrets() -> Any:
    """The secrets `pipeline up` put in this process's environment (parsed JSON), None when it put none."""
    given = os.environ.get(SECRETS)
    return None if given is None else json.loads(given)


def rewrite(run_dir: Path, cfg: Any) -> bool:
    """Write `cfg` again for the running stack (a reload changed its models): same run id, and the same secrets
    as the stages were given. True too when no `pipeline up` runs the stack (its stages validate the file
    themselves); False, and no file, when the stages could not read `cfg` from it."""
    run = os.environ.get(RUN)
    if not run:
        return True
    given = _given_secrets()
    values = write(run_dir, cfg, run)
    if values is None or (given is not None and given != values):
        (run_dir / FILE).unlink(missing_ok=True)
        return False
    return True


def read(run_dir: Path, source: str | os.PathLike[str]) -> Config | None:
    """The configuration `write` left in `run_dir` for the file `source` and this process's run, if any."""
    run = os.environ.get(RUN)
    if not run:
        return None
    try:
        body = json.loads((run_dir / FILE).read_text())
        if body.get("format") != FORMAT or body.get("run") != run or body.get("source") != str(Path(source).resolve()):
            return None
        secrets = _given_secrets()
        if secrets is not None and (not isinstance(secrets, list) or len(secrets) != body["secrets"]):
            return None
        cfg = _decode(body["config"], secrets)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    return cfg if isinstance(cfg, Config) else None


def withheld_variables(source: Path) -> list[str]:
    """The environment variables the file's secret sections name: kept from the processes that need no secret."""
    import yaml

    try:
        raw = yaml.safe_load(source.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError, RecursionError):
        return []
    found: set[str] = set()
    seen: set[int] = set()  # a YAML alias may hold itself
    stack = [raw.get(k) for k in SECRET_SECTIONS] if isinstance(raw, dict) else []
    while stack:
        node = stack.pop()
        if isinstance(node, dict | list):
            if id(node) in seen:
                continue
            seen.add(id(node))
        if isinstance(node, dict):
            stack += node.values()
        elif isinstance(node, list):
            stack += node
        elif isinstance(node, str):
            found.update(_REFS.findall(node))
    return sorted(found)
