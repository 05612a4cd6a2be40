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


Seconds = Annotated[float, BeforeValidator(duration), Field(gt=0)]
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

