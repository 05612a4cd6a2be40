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


def _plain(value: Any) -> Any:
    """A copy of a dict (the ModelSource gets its own); anything else as it is."""
    return dict(value) if isinstance(value, dict) else value


class BrokerMixin:
    """What a broker's fields tell: scheme, host, port, whether it is the embedded broker."""

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
    """What a model's fields tell: its source and where it is."""

    __slots__ = ()

    @property
    def source(self) -> ModelSource:
        """What `pipeline.models.packages.resolve` takes."""
        from pipeline.models.packages.sources import ModelSource

        return ModelSource(self.path, self.url, _plain(self.urls), _plain(self.sha256), _plain(self.md5),
                           self.insecure)

    @property
    def where(self) -> str:
        """The source as shown to people: the path, or the url(s) without credentials."""
        from pipeline.models.packages.sources import redact

        if self.path is not None:
            return str(self.path)
        shown = [f"{arch}: {redact(url)}" for arch, url in (self.urls or {}).items()]
        return ", ".join(shown + ([redact(self.url)] if self.url else []))


class PackagesMixin:
    """What the `packages` fields tell: the limits of a download."""

    __slots__ = ()

    def limits(self) -> Limits:
        from pipeline.models.packages.sources import Limits

        return Limits(**self.model_dump())  # type: ignore[attr-defined]


SHADOW_TOPICS = "pipeline/shadow"  # a shadow's results go to SHADOW_TOPICS/<rule>, its error records below it
SHADOW, CANARY = "shadow", "canary"  # the kinds of trial: a rule's companion that runs a candidate model


def trial_name(rule: str, kind: str) -> str:
    """The name of a rule's companion (`<rule>~shadow`, `<rule>~canary`): "~" is in no rule name of a file."""
    return f"{rule}~{kind}"


POOL = "pool"  # what a model's pool of shared workers is served as: a unit `<model>~pool` of the fork server
SHARED = "shared"  # `workers: shared` on a rule: its model's pool serves it


def pool_unit(model: str) -> str:
    """The name a model's pool goes by where a rule's name would (`<model>~pool`: fork server slots, fatal file, logs,
    hot reload): "~" is in no rule or model name of a file."""
    return f"{model}~{POOL}"


def pooled_model(unit: str) -> str | None:
    """The model whose pool `unit` names; None when `unit` names a rule."""
    model, sep, kind = unit.rpartition("~")
    return model if sep and kind == POOL else None


def shadow_topic(rule: str) -> str:
    """Where the shadow of the rule `rule` publishes its results (never the rule's own topic)."""
    return f"{SHADOW_TOPICS}/{rule}"


class RuleMixin:
    """What a rule's fields tell: its error topic, and the companions its shadow and canary run as."""

    __slots__ = ()

    @property
    def error_topic(self) -> str:
        return self.errors.topic or f"pipeline/errors/{self.name}"

    def trials(self) -> list[Any]:
        """The companion rules of this rule's `shadow` and `canary`: the same subscription and limits, the candidate
        model on workers of their own. A shadow publishes at QoS 0 on `shadow_topic(name)` (error records below
        it); a canary publishes where the rule does."""
        made, common = [], {"shadow": None, "canary": None, "trial_of": self.name}
        if self.shadow is not None:
            topic = shadow_topic(self.name)
            made.append(self.model_copy(update={  # type: ignore[attr-defined]
                **common, "name": trial_name(self.name, SHADOW), "trial": SHADOW, "model": self.shadow.model,
                "workers": self.shadow.workers, "overflow": "drop_new",
                "pub": self.pub.model_copy(update={"topic": topic, "qos": 0, "retain": False}),
                "errors": self.errors.model_copy(update={"topic": f"{topic}/errors"})}))
        if self.canary is not None:
            made.append(self.model_copy(update={  # type: ignore[attr-defined]
                **common, "name": trial_name(self.name, CANARY), "trial": CANARY, "model": self.canary.model,
                "workers": self.canary.workers, "errors": self.errors.model_copy(update={"topic": self.error_topic})}))
        return made


class ConfigMixin:
    """What a whole configuration can do: its instance name, default run directory, rule lookup, overrides."""

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

    def pools(self) -> dict[str, list[Any]]:
        """model -> the rules its pool serves (those with `workers: shared`), for every model with such rules."""
        out: dict[str, list[Any]] = {}
        for r in self.rules:
            if r.shared:
                out.setdefault(r.model, []).append(r)
        return out

    def live_rules(self) -> list[Any]:
        """The rules of the file, without the companions their shadows and canaries run as."""
        return [r for r in self.rules if r.trial is None]

    def rule_index(self, name: str) -> int:
        return self.rules.index(self.rule(name))
