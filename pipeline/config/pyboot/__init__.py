"""The old runtime's (pyboot) configuration files, in the three versions its users hold, as native ones.

Every version has `mqtts:` (broker connections: name, broker tcp://HOST:PORT, qos (missing: 0), retain (missing:
false), applying to all that is subscribed and published on them), unnamed `rules:` (`sub: {name, clientId,
topic}`, `pub: {name, clientId, timeout, topic}`; `pub.timeout` missing: 10s, a bare number: seconds) and a
top-level `funcs:` list; every rule runs every func. A func's model and devices are written per version:

    version 1   model_address, model_md5; deviceName and pointName as plain fields
    version 2   model_address, model_md5; device: [{deviceName, deviceParseExpression, pointName, pointParseExpression}]
    version 3   modelAmd64Address / modelArm64Address or modelAddress, modelMd5;
                devices: [{deviceName, deviceAttr: [{attrName, attrValue, attrExpression}]}]

Converted: rule i crossed with func j is the native rule `r<i>-f<j>-<modelName>` (indexes from 0, as in the
file's key paths): rule i's subscription, func j's model (one native model per distinct address and checksum,
named after modelName) and devices (a `filter`, parsed, never evaluated: pipeline.config.pyboot.devices), rule i's
publication and `pub.timeout` as the model-call timeout; results "{}" and "null" are not published, as pyboot did.
Each mqtts entry a rule names becomes a broker (QoS 2 becomes 1). Keys the old runtime ignored (`expose:`, ...)
and `clientId` are ignored and listed; keys that look like a misspelling of a read key are errors. Native
sections (control:, data_dir:, ...) may be added to an old file and are kept. Where the file behaves
differently than under the old runtime, a warning says so (README, "The old runtime's configuration files").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config.pyboot.converter import Converter
from pipeline.config.pyboot.keys import NATIVE
from pipeline.errors import ConfigError

__all__ = ["NATIVE", "Conversion", "convert", "is_pyboot"]

# differences every converted file has, whatever it holds (the README's compatibility section explains each)
ALWAYS = (
    "a model exception goes to the rule's error topic (pipeline/errors/<rule>) as a JSON record, not to the "
    "output topic as the text 'internal exception: ...'",
    "pub.timeout is enforced: a model call that takes longer is stopped and reported (the old runtime never "
    "enforced it)",
)


@dataclass(frozen=True, kw_only=True)
class Conversion:
    """An old file read: the native configuration (a plain dict), the version(s) of the old format its funcs
    are written in, the keys ignored (each named once) and where it behaves differently than before."""

    native: dict[str, Any]
    version: str
    ignored: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def is_pyboot(raw: Any) -> bool:
    """True for a mapping in the old runtime's format (it has `mqtts:` and no `brokers:`)."""
    return isinstance(raw, dict) and "mqtts" in raw and "brokers" not in raw


def convert(raw: dict[str, Any], source: Path | str = "pyboot.yaml") -> Conversion:
    """The native configuration equivalent to an old one; raise ConfigError naming each problem."""
    converter = Converter(source=Path(source).resolve())
    body = converter.convert(raw)
    report = converter.report
    if report.problems:
        raise ConfigError(source, report.problems)
    native = {k: raw[k] for k in NATIVE if k in raw}
    if "name" in native:
        native["name"] = str(native["name"])
    return Conversion(native={**native, **body}, version=converter.version, ignored=list(report.ignored),
                      warnings=[*report.warnings, *ALWAYS])
