"""What the configuration classes can do besides holding fields, shared by the pydantic models
(pipeline.config.schema, pipeline.config.load) and the plain records of pipeline.config.snapshot: both inherit
these mixins.
No annotations here: pydantic would take them for fields."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pipeline import digest

if TYPE_CHECKING:
    from pipeline.models.packages.sources import Limits, ModelSource


class BrokerMixin:
    __slots__ = ()

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


class ModelMixin:
    __slots__ = ()

    @property
    def source(self) -> ModelSource:
        """What `pipeline.models.packages.resolve` takes."""
        from pipeline.models.packages.sources import ModelSource

        copy = (lambda d: dict(d) if isinstance(d, dict) else d)  # noqa: E731
        return ModelSource(self.path, self.url, copy(self.urls), copy(self.sha256), copy(self.md5), self.insecure)

    @property
    def where(self) -> str:
        """The source as shown to people: the path, or the url(s) without credentials."""
        from pipeline.models.packages.sources import redact

        if self.path is not None:
            return str(self.path)
        shown = [f"{arch}: {redact(url)}" for arch, url in (self.urls or {}).items()]
        return ", ".join(shown + ([redact(self.url)] if self.url else []))


class PackagesMixin:
    __slots__ = ()

    def limits(self) -> Limits:
        from pipeline.models.packages.sources import Limits

        return Limits(**self.model_dump())  # type: ignore[attr-defined]


class RuleMixin:
    __slots__ = ()

    @property
    def error_topic(self) -> str:
        return self.errors.topic or f"pipeline/errors/{self.name}"


class ConfigMixin:
    __slots__ = ()

    @property
    def instance(self) -> str:
        """Stable name of this stack: used in MQTT client ids and the default run directory."""
        tag = digest.sha1(str(self.source).encode()).hexdigest()[:6]
        return self.name or f"{self.source.stem}-{tag}"

    def default_run_dir(self) -> Path:
        from pipeline.supervision import run_dir as rundir

        return self.run_dir or rundir.default(self.instance)

    def default_data_dir(self) -> Path:
        """Outbox and model cache: must survive reboots, so not under /tmp."""
        if self.data_dir:
            return self.data_dir if self.data_dir.is_absolute() else self.source.parent / self.data_dir
        env = os.environ.get("PIPELINE_DATA_DIR")
        return Path(env) if env else Path.home() / ".local" / "state" / "pipeline" / self.instance

    def rule(self, name: str) -> Any:
        for r in self.rules:
            if r.name == name:
                return r
        raise KeyError(f"no rule named '{name}' in {self.source} (rules: {', '.join(r.name for r in self.rules)})")

    def with_workers(self, workers: dict[str, int]) -> Any:
        """This config with some rules' worker counts overridden (`--workers RULE=N`)."""
        rules = [r.model_copy(update={"workers": workers[r.name]}) if r.name in workers else r for r in self.rules]
        return self.model_copy(update={"rules": rules})  # type: ignore[attr-defined]

    def rule_index(self, name: str) -> int:
        return self.rules.index(self.rule(name))
