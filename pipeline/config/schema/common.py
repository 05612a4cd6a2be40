"""Building blocks of the configuration schema: strict models, names, durations, cross-references."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
)

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def duration(value: Any) -> Any:
    """'10s', '250ms', '2m', '1h', '7d' or a plain number of seconds -> float seconds."""
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*", value)
        if not m:
            raise ValueError("expected a duration such as 500ms, 10s, 2m, 1h or 7d")
        return float(m.group(1)) * _UNITS[m.group(2) or "s"]
    return value


def share(value: Any) -> Any:
    """'1%', '0.5 %' or a plain fraction such as 0.01 -> float fraction (0.01)."""
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*%\s*", value)
        if not m:
            raise ValueError("expected a share such as 1% or 0.01")
        return float(m.group(1)) / 100.0
    return value


def percent(value: Any) -> Any:
    """'10%' or a plain number of percent such as 10 -> float percent (10.0)."""
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*%?\s*", value)
        if not m:
            raise ValueError("expected a percentage such as 10 or 10%")
        return float(m.group(1))
    return value


Seconds = Annotated[float, BeforeValidator(duration), Field(gt=0)]
Share = Annotated[float, BeforeValidator(share), Field(ge=0, le=1)]  # of results, e.g. an error rate
Percent = Annotated[float, BeforeValidator(percent), Field(gt=0, le=100)]
Name = Annotated[str, Field(pattern=_NAME)]


class Strict(BaseModel):
    """Base of the configuration's sections: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def must_be_defined(kind: str, v: str, info: ValidationInfo) -> str:
    """`v` when the validation context defines it among `kind` (brokers, models), else a ValueError naming them."""
    known = (info.context or {}).get(kind)
    if known is not None and v not in known:
        names = ", ".join(sorted(known)) or "none"
        raise ValueError(f"no {kind[:-1]} named '{v}' is defined under '{kind}:' (defined: {names})")
    return v

