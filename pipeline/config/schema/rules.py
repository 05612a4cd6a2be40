"""Configuration sections for what runs: rules and the stack's own settings."""

from __future__ import annotations

import ipaddress
import os
import ssl
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    ByteSize,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from pipeline import topics
from pipeline.config.schema.behaviour import CANARY, SHADOW, SHARED, RuleMixin
from pipeline.config.schema.common import Name, Percent, Seconds, Share, Strict, must_be_defined
from pipeline.control.hosts import name_problem, normal
from pipeline.keyed import keys
from pipeline.models.filters import filter_problems


class Sub(Strict):
    """`rules[].sub`: the broker and topic filter a rule subscribes to, and its QoS."""

    broker: str
    topic: str
    qos: Literal[0, 1] = 1
    share: str | None = Field(None, pattern=r"^[^/+#\s]{1,64}$")  # MQTT 5 shared subscription group ($share/GROUP/)

    _broker = field_validator("broker")(lambda cls, v, info: must_be_defined("brokers", v, info))
    _topic = field_validator("topic")(lambda cls, v: topics.check_filter(v))

    @model_validator(mode="after")
    def _share_needs_mqtt5(self, info: ValidationInfo) -> Sub:
        """`auto` is allowed: the link refuses to subscribe, and says why, if the broker turns out to speak only
        3.1.1. An explicit 3.1.1, or the embedded broker (3.1.1 only), is refused here."""
        protocol = ((info.context or {}).get("protocols") or {}).get(self.broker, "5")
        if self.share is not None and protocol == "embedded":
            raise PydanticCustomError(
                "share_protocol", "a shared subscription needs MQTT 5, and the embedded broker speaks only 3.1.1: "
                "use a broker that speaks MQTT 5 (Mosquitto)", {"at": "share", "value": self.share})
        if self.share is not None and protocol not in ("5", "auto"):
            raise PydanticCustomError(
                "share_protocol", "a shared subscription needs MQTT 5: set brokers.{broker}.protocol: \"5\" (or auto)",
                {"at": "share", "broker": self.broker, "value": self.share})
        return self


class Pub(Strict):
    """`rules[].pub`: the broker and topic template a rule publishes its results to."""

    broker: str
    topic: str
    qos: Literal[0, 1] = 1
    retain: bool = False

    _broker = field_validator("broker")(lambda cls, v, info: must_be_defined("brokers", v, info))


class Errors(Strict):
    """`rules[].errors`: where a rule's error records go."""

    topic: str | None = None


class State(Strict):
    """`rules[].state`: the bounds of the per-key state of a keyed rule."""

    max_bytes: ByteSize = ByteSize(64 << 10)  # one key's state, encoded; a result that would pass it is an error
    expire_after: Seconds = 7 * 86400.0  # a key's state not written for this long counts as empty (and is deleted)


class Shadow(Strict):
    """`rules[].shadow`: a candidate model that gets every message the rule gets, best effort; its results go to
    pipeline/shadow/<rule> only."""

    model: str
    workers: int = Field(1, ge=0, le=64)
    percent: Percent = 100.0  # of the rule's messages copied to it, evenly spread (a keyed rule's shadow: all)

    _model = field_validator("model")(lambda cls, v, info: must_be_defined("models", v, info))


class Canary(Strict):
    """`rules[].canary`: a candidate model that serves `percent` of the keys on the rule's own topic, rolled back
    when it passes a limit over `window`; once it held for a window, `then` says what follows."""

    model: str
    percent: Percent = 10.0  # of the keys (a hash of the key: a key always sees the same version)
    key: list[str] | None = None  # what a key is (as a rule's key:); default: the input topic
    max_error_rate: Share = 0.01  # error records among the candidate's results over the window
    max_p99: Seconds | None = None  # the candidate's model call p99 over the window; default: no latency limit
    window: Seconds = 60.0
    then: Literal["promote", "rollback"] = "rollback"  # once it held for a window: serve every key, or end it
    workers: int = Field(1, ge=0, le=64)

    _model = field_validator("model")(lambda cls, v, info: must_be_defined("models", v, info))

    @field_validator("key", mode="before")
    @classmethod
    def _key(cls, v: Any) -> Any:
        return _parsed_key(v)


def _parsed_key(v: Any) -> Any:
    """A key: as written (one part or a list of them), as a list; PydanticCustomError naming the bad part."""
    if v is None:
        return v
    try:
        keys.parse(v)
    except ValueError as e:
        raise PydanticCustomError("key", "{msg}", {"msg": str(e), "value": v}) from None
    return [v] if isinstance(v, str) else v


class Rule(RuleMixin, Strict):  # error_topic, trials()
    """One of `rules`: subscription, model, publication, workers and limits of one flow."""

    name: Name
    sub: Sub
    model: str
    pub: Pub
    workers: int = Field(1, ge=0, le=64)  # 0: no local worker, the rule is served by remote workers; see _shared
    shared: bool = False  # `workers: shared` in a file: the model's pool serves the rule (its own workers: 0)
    timeout: Seconds = 10.0
    errors: Errors = Errors()
    max_attempts: int = Field(3, ge=1, le=100)  # dispatches of one message before it is dead-lettered
    backlog: int = Field(10_000, ge=10)  # messages ingress holds for this rule, not yet given to a worker
    overflow: Literal["drop_new", "drop_old"] = "drop_new"  # QoS 0 only: what goes when the backlog is full
    max_payload_bytes: ByteSize = ByteSize(1 << 20)
    max_rss: ByteSize | None = None  # a worker above this RSS finishes its frame and is replaced
    filter: dict[str, Any] | None = None  # see pipeline.models.filters; a message it refuses gives no output
    skip_results: list[str] = []  # a result that is one of these strings is not published (as None is not)
    key: list[str] | None = None  # see pipeline.keyed.keys: messages with one key value are called in order
    key_default: str | None = Field(None, min_length=1, max_length=keys.MAX_KEY)  # for messages without a key value
    state: State = State()
    shadow: Shadow | None = None  # a candidate model beside this one, on a copy of every message (best effort)
    canary: Canary | None = None  # a candidate model serving a share of the keys, rolled back past its limits
    trial: Literal["shadow", "canary"] | None = None  # set on the companion a shadow or canary runs as, never in a file
    trial_of: str | None = None  # that companion's rule

    _model = field_validator("model")(lambda cls, v, info: must_be_defined("models", v, info))

    @field_validator("key", mode="before")
    @classmethod
    def _key(cls, v: Any) -> Any:
        return _parsed_key(v)

    @model_validator(mode="before")
    @classmethod
    def _shared(cls, data: Any) -> Any:
        """`workers: shared` becomes `shared: true` with no worker of the rule's own; `shared` is never in a file."""
        if not isinstance(data, dict):
            return data
        if "shared" in data:
            raise PydanticCustomError("shared", "write `workers: shared`, not {at}", {"at": "shared",
                                                                                       "value": data["shared"]})
        workers = data.get("workers")
        if isinstance(workers, str) and workers != SHARED and not workers.isdigit():
            raise PydanticCustomError("workers", "{at} is a number of workers (0-64) or '{shared}'",
                                      {"at": "workers", "shared": SHARED, "value": workers})
        if workers != SHARED:
            return data
        return {**data, "workers": 0, "shared": True}

    @model_validator(mode="after")
    def _pooled(self) -> Rule:
        """What a pool process cannot do for one of its rules alone is refused on a shared rule."""
        if not self.shared:
            return self
        for given in ("key", "shadow", "canary", "max_rss"):
            value = getattr(self, given)
            if isinstance(value, list):  # key: its parts
                value = ", ".join(value)
            if value is not None:
                raise PydanticCustomError("shared", "{at} is not supported on a rule with workers: shared (its model's "
                                          "pool serves it): give the rule workers of its own",
                                          {"at": given, "value": getattr(value, "model", value)})
        return self

    @model_validator(mode="after")
    def _trials(self) -> Rule:
        for given in ("trial", "trial_of"):
            if given in self.model_fields_set:
                raise PydanticCustomError("trial", "{at} is set by the stack on a shadow's or canary's companion "
                                          "rule, not in a file", {"at": given})
        for kind, spec in ((SHADOW, self.shadow), (CANARY, self.canary)):
            if spec is not None and spec.model == self.model:
                raise PydanticCustomError("candidate", "the candidate must be another model than the rule's "
                                          "(model: {live})", {"at": f"{kind}.model", "live": self.model,
                                                              "value": spec.model})
        if self.shadow is not None and self.key is not None and self.shadow.percent < 100:
            raise PydanticCustomError("shadow_keyed", "a keyed rule's shadow gets every message (its states follow "
                                      "each key's whole history): leave shadow.percent out",
                                      {"at": "shadow.percent", "value": self.shadow.percent})
        if self.canary is not None:
            self._canary_key(self.canary)
        return self

    def _canary_key(self, canary: Canary) -> None:
        if self.key is not None:
            raise PydanticCustomError("canary_keyed", "a canary on a rule with key: is not supported: each key's "
                                      "state would be split between two versions (a shadow keeps states of its own)",
                                      {"at": "canary", "value": canary.model})
        if canary.key is not None:
            try:
                keys.check_levels(keys.parse(canary.key), self.sub.topic)
            except ValueError as e:
                raise PydanticCustomError("key", "{msg}", {"at": "canary.key", "msg": str(e),
                                                           "value": canary.key}) from None

    @model_validator(mode="after")
    def _keyed(self) -> Rule:
        if self.key is None:
            for given in ("key_default", "state"):
                if given in self.model_fields_set:
                    raise PydanticCustomError("needs_key", "{at} is for a keyed rule: set key: too",
                                              {"at": given, "value": []})
            return self
        try:
            keys.check_levels(keys.parse(self.key), self.sub.topic)
        except ValueError as e:
            raise PydanticCustomError("key", "{msg}", {"at": "key", "msg": str(e), "value": self.key}) from None
        return self

    @field_validator("filter")
    @classmethod
    def _filter(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        problems = filter_problems(v, "filter") if v is not None else []
        if problems:
            at, _, msg = problems[0].partition(": ")
            ctx = {"msg": "; ".join([msg, *problems[1:]]), "value": []}  # the value: not echoed (a mapping)
            if at != "filter":
                ctx["at"] = at.removeprefix("filter.")
            raise PydanticCustomError("filter", "{msg}", ctx)
        return v

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


class ControlTls(Strict):
    """HTTPS for the control API: PEM files, relative to the config file; both are read at `pipeline check`."""

    cert: Path  # the server certificate (and its chain), PEM
    key: Path  # its private key, PEM, unencrypted

    @field_validator("cert", "key")
    @classmethod
    def _file(cls, v: Path, info: ValidationInfo) -> Path:
        p = (v if v.is_absolute() else Path((info.context or {}).get("base", ".")) / v).resolve()
        if not p.is_file():
            raise ValueError(f"no such file: {p}")
        if not os.access(p, os.R_OK):
            raise ValueError(f"not readable by this user: {p}")
        return p

    @model_validator(mode="after")
    def _pair(self) -> ControlTls:
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(self.cert, self.key)
        except (ssl.SSLError, OSError) as e:
            raise PydanticCustomError("tls", "cert {cert} and key {key} do not load as a pair: {why}",
                                      {"cert": str(self.cert), "key": str(self.key), "why": str(e)}) from None
        return self


class Control(Strict):
    """`control`: where the control API listens and who may use it."""

    listen: str = Field("127.0.0.1:5888", pattern=r"^[^:\s]+:\d{1,5}$")
    token: SecretStr | None = None  # mutating endpoints need "Authorization: Bearer <token>"; without: disabled
    protect_reads: bool = False  # the token is needed by every read too, but /healthz, /readyz and the dashboard page
    allowed_hosts: list[str] = []  # DNS names the API answers to besides IP addresses, localhost and listen's host
    tls: ControlTls | None = None  # HTTPS; without it the token crosses the network in clear

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, v: list[str]) -> list[str]:
        for i, name in enumerate(v):
            why = name_problem(name)
            if why is not None:
                raise PydanticCustomError("host", "allowed_hosts[{i}] is '{name}': {why}",
                                          {"i": i, "name": name, "why": why})
        return [normal(n) for n in v]

    @field_validator("token", mode="before")
    @classmethod
    def _token(cls, v: Any) -> Any:
        if v is None or (isinstance(v, str) and not v.strip()):
            return None  # token: ${PIPELINE_TOKEN:-} with the variable unset or empty: no token
        if not isinstance(v, str) or len(v.strip()) < 16:  # "value": [] keeps the secret out of the message
            raise PydanticCustomError("token", "expected a string of at least 16 characters (openssl rand -hex 16)",
                                      {"value": []})
        return v.strip()

    @model_validator(mode="after")
    def _reads(self) -> Control:
        if self.protect_reads and self.token is None:
            raise PydanticCustomError("token", "protect_reads needs control.token", {"at": "protect_reads"})
        return self


class Outbox(Strict):
    """`outbox`: egress's store of results waiting for their broker."""

    max_bytes: ByteSize = ByteSize(256 << 20)  # full: egress stops taking results (backpressure), drops nothing
    drain_rate: int = Field(5000, ge=1)  # msg/s cap while catching up after the broker was unreachable
    synchronous: Literal["full", "normal"] = "full"  # SQLite's: full keeps every confirmed result through power loss


PORTS = 100  # a stack on tcp uses base_port + 0..3 and base_port + 10 + rule index


class Remote(Strict):
    """Workers on other boxes join over tcp, encrypted and authenticated with ZMQ CURVE (`pipeline keys`)."""

    listen: str = "127.0.0.1"  # the interface to bind (0.0.0.0: all); ports base_port + offset, as with tcp
    base_port: int = Field(5900, ge=1024, le=65000)
    server_key: Path  # the stack's key pair: the <name>.key_secret file
    authorized_keys: Path  # folder of the workers' public <name>.key files allowed in

    @field_validator("server_key", "authorized_keys")
    @classmethod
    def _relative_to_config(cls, v: Path, info: ValidationInfo) -> Path:
        # read when the stack starts (a worker box shares the config file, not the stack's secret key)
        return (v if v.is_absolute() else Path((info.context or {}).get("base", ".")) / v).resolve()


class Endpoints(Strict):
    """`endpoints`: the transport of the stack's ZeroMQ sockets (ipc or tcp), and remote workers."""

    transport: Literal["ipc", "tcp"] = "ipc"
    host: str = "127.0.0.1"
    base_port: int = Field(5800, ge=1024, le=65000)
    remote: Remote | None = None

    @field_validator("host")
    @classmethod
    def _loopback(cls, v: str) -> str:
        """The stages' own sockets take frames from anyone who reaches them, unauthenticated: loopback only.
        Workers on other boxes join through `remote`, over CURVE."""
        try:
            loopback = ipaddress.ip_address(v).is_loopback
        except ValueError:
            loopback = v == "localhost"
        if not loopback:
            raise ValueError("the stages' tcp sockets have no authentication: bind them to loopback (127.0.0.1, "
                             "::1 or localhost); workers on other boxes join through endpoints.remote (CURVE)")
        return v

    @model_validator(mode="after")
    def _ports_apart(self) -> Endpoints:
        if self.remote and self.transport == "tcp" and abs(self.remote.base_port - self.base_port) < PORTS:
            raise PydanticCustomError("ports", "remote.base_port must be at least {n} away from base_port",
                                      {"at": "remote.base_port", "n": PORTS})
        return self


