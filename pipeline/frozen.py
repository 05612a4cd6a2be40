"""The validated configuration without pydantic, for the stages of a stack (~18 MiB less in each process).

`pipeline up` validates the file (pipeline.config, pydantic) and `write()`s the result to `<run dir>/config.json`;
a stage started with that run dir `read()`s it when it was made from the same file (same path, same bytes, same
values of the environment variables the file names), and otherwise validates the file itself. The classes
here have the attributes of pipeline.config's, as validated, and the same properties and methods: both take
them from the mixins of pipeline.schema.behaviour, plus `model_dump()` and `model_copy()`.

Secrets (broker passwords, the control token) never appear in the file, which lives in the run dir: it holds
them XORed with a one-time pad that `write` puts in the environment ($PIPELINE_CONFIG_KEY, hex), which
supervisord and so every stage inherit. Without that key (a stage started by another supervisord) a
stage validates the file itself. The file is written mode 0600 all the same.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from pipeline import digest
from pipeline.schema.behaviour import BrokerMixin, ConfigMixin, ModelMixin, PackagesMixin, RuleMixin

FILE = "config.json"
KEY = "PIPELINE_CONFIG_KEY"
FORMAT = 1
_REFS = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")  # the variables pipeline.config._ENV expands


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

    __str__ = lambda self: "**********"  # noqa: E731


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
    if isinstance(v, Value):
        return v.model_dump()
    if isinstance(v, dict):
        return {k: _dump(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return type(v)(_dump(x) for x in v)
    return v


class Sub(Value): pass  # noqa: E701
class Pub(Value): pass  # noqa: E701
class Errors(Value): pass  # noqa: E701
class Control(Value): pass  # noqa: E701
class ControlTls(Value): pass  # noqa: E701
class Outbox(Value): pass  # noqa: E701
class Endpoints(Value): pass  # noqa: E701
class Remote(Value): pass  # noqa: E701
class Rule(RuleMixin, Value): pass  # noqa: E701
class Broker(BrokerMixin, Value): pass  # noqa: E701
class Model(ModelMixin, Value): pass  # noqa: E701
class Packages(PackagesMixin, Value): pass  # noqa: E701
class Config(ConfigMixin, Value): pass  # noqa: E701


_CLASSES = {c.__name__: c for c in (Sub, Pub, Errors, Control, ControlTls, Outbox, Endpoints, Remote, Rule, Broker,
                                    Model, Packages, Config)}


# -- the file --

def fingerprint(source: Path) -> str:
    """sha256 of what validation read: the file's bytes and the values of the variables it names."""
    data = source.read_bytes()
    h = digest.sha256(data)
    for name in sorted(set(_REFS.findall(data.decode("utf-8", "replace")))):
        value = os.environ.get(name)
        h.update(b"\0" + name.encode() + (b"" if value is None else b"\1" + value.encode("utf-8", "surrogateescape")))
    return h.hexdigest()


def _encode(v: Any, secrets: list[str]) -> Any:
    """JSON for a validated value; secrets are appended to `secrets` and written as their index there."""
    fields = getattr(type(v), "model_fields", None)
    if fields is not None and type(v).__name__ in _CLASSES:  # a pydantic model of pipeline.config
        return {"__class__": type(v).__name__, **{k: _encode(getattr(v, k), secrets) for k in fields}}
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


def _decode(v: Any, secrets: list[str]) -> Any:
    if isinstance(v, list):
        return [_decode(x, secrets) for x in v]
    if not isinstance(v, dict):
        return v
    if "__path__" in v:
        return Path(v["__path__"])
    if "__secret__" in v:
        return Secret(secrets[v["__secret__"]])
    if "__dict__" in v:
        return {k: _decode(x, secrets) for k, x in v["__dict__"].items()}
    fields = dict(v)
    return _CLASSES[fields.pop("__class__")](**{k: _decode(x, secrets) for k, x in fields.items()})


def _xor(data: bytes, pad: bytes) -> bytes:
    return bytes(a ^ b for a, b in zip(data, pad, strict=True))


def _seal(secrets: list[str]) -> tuple[dict[str, Any], str]:
    """({"check": the pad's first 16 bytes, "values": each secret XORed with its own later part of the pad}
    in hex; the pad in hex). The check tells a stage holding another stack's key from one holding this one."""
    raw = [x.encode("utf-8", "surrogateescape") for x in secrets]
    pad = os.urandom(16 + sum(len(x) for x in raw))
    values, at = [], 16
    for x in raw:
        values.append(_xor(x, pad[at:at + len(x)]).hex())
        at += len(x)
    return {"check": pad[:16].hex(), "values": values}, pad.hex()


def _unseal(sealed: dict[str, Any], pad_hex: str) -> list[str]:
    """The secrets back; ValueError when `pad_hex` is not the key they were sealed with."""
    raw = [bytes.fromhex(x) for x in sealed["values"]]
    pad = bytes.fromhex(pad_hex)
    if len(pad) != 16 + sum(len(x) for x in raw) or pad[:16].hex() != sealed["check"]:
        raise ValueError("not the key of this file")
    out, at = [], 16
    for x in raw:
        out.append(_xor(x, pad[at:at + len(x)]).decode("utf-8", "surrogateescape"))
        at += len(x)
    return out


def write(run_dir: Path, source: str | os.PathLike[str]) -> bool:
    """Validate `source` and write the result for the stages, and the key to its secrets into os.environ (for
    the processes started next); False (and no file) when it cannot be written faithfully, or the file changed
    meanwhile: then every stage validates the file itself, as before."""
    from pipeline import config
    from pipeline.errors import PipelineError

    target = run_dir / FILE
    target.unlink(missing_ok=True)
    path = Path(source).resolve()
    try:
        before = fingerprint(path)
        cfg = config.load(path)
        secrets: list[str] = []
        body = {"format": FORMAT, "source": str(path), "fingerprint": before, "config": _encode(cfg, secrets)}
        body["secrets"], key = _seal(secrets)
        text = json.dumps(body, allow_nan=False)
        if fingerprint(path) != before:
            return False
    except (PipelineError, TypeError, ValueError, OSError):
        return False
    back = json.loads(text)
    if _decode(back["config"], _unseal(back["secrets"], key)).model_dump() != cfg.model_dump():
        return False  # e.g. a YAML date in a filter
    os.environ[KEY] = key
    tmp = run_dir / f".{FILE}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, target)
    return True


def read(run_dir: Path, source: str | os.PathLike[str]) -> Config | None:
    """The configuration `write` left in `run_dir` for the file `source`, if it still describes that file."""
    try:
        body = json.loads((run_dir / FILE).read_text())
        path = Path(source).resolve()
        if body.get("format") != FORMAT or body.get("source") != str(path) or \
                body.get("fingerprint") != fingerprint(path):
            return None
        cfg = _decode(body["config"], _unseal(body["secrets"], os.environ.get(KEY, "")))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return cfg if isinstance(cfg, Config) else None
