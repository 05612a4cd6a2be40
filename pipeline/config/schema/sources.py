"""Configuration sections for where things come from: brokers and model packages."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import (
    ByteSize,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from pipeline.config.schema.behaviour import BrokerMixin, ModelMixin, PackagesMixin
from pipeline.config.schema.common import Seconds, Strict
from pipeline.models.packages.sources import parse_md5, parse_sha256, redact


class Broker(BrokerMixin, Strict):  # scheme, host, port, embedded
    """One of `brokers`: an MQTT broker's URL, credentials and TLS."""

    url: str  # user:password@ in the url is moved to username / password (and never shown)
    username: str | None = None
    password: SecretStr | None = None
    keepalive: int = Field(30, ge=5, le=3600)
    # MQTT version. auto: MQTT 5, or 3.1.1 when the broker refuses 5 (the embedded broker: 3.1.1 only)
    protocol: Literal["auto", "3.1.1", "5"] = "auto"
    ca: Path | None = None  # mqtts: CA certificate(s) (PEM) the broker's certificate must chain to; default: system CAs
    cert: Path | None = None  # mqtts: client certificate (PEM), for brokers that authenticate clients by certificate
    key: Path | None = None  # mqtts: the client certificate's private key (PEM, unencrypted) when not in `cert`
    insecure: bool = False  # mqtts: do not check that the certificate names the host (the chain is still checked)
    max_packet_bytes: ByteSize | None = None  # the largest packet the broker takes; MQTT 5 brokers say it themselves

    @model_validator(mode="before")
    @classmethod
    def _credentials_in_url(cls, data: Any) -> Any:
        """mqtt://user:pass@host -> url mqtt://host, username, password (those keys, when given, win)."""
        m = re.fullmatch(r"([A-Za-z][A-Za-z0-9+.-]*://)([^/@]*)@(.*)", data.get("url") or "", re.S) \
            if isinstance(data, dict) and isinstance(data.get("url"), str) else None
        if m is None:
            return data
        user, _, password = m.group(2).partition(":")
        out = {**data, "url": m.group(1) + m.group(3)}
        if user and not out.get("username"):
            out["username"] = unquote(user)
        if password and out.get("password") in (None, ""):
            out["password"] = unquote(password)
        return out

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

    @field_validator("protocol", mode="before")
    @classmethod
    def _version(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v  # YAML `protocol: 5` is a number

    @field_validator("ca", "cert", "key")
    @classmethod
    def _tls_file(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        if v is None:
            return v
        p = (v if v.is_absolute() else Path((info.context or {}).get("base", ".")) / v).resolve()
        if not p.is_file():
            raise ValueError(f"no such file: {p}")
        return p

    @model_validator(mode="after")
    def _tls_options(self) -> Broker:
        given = [k for k in ("ca", "cert", "key", "insecure") if getattr(self, k)]
        if given and self.scheme != "mqtts":
            raise PydanticCustomError("tls", "a TLS option needs an mqtts:// url (url is {url})",
                                      {"at": given[0], "url": self.url, "value": str(getattr(self, given[0]))})
        if self.key and not self.cert:
            raise PydanticCustomError("tls", "key is the private key of cert: give cert too", {"at": "key"})
        return self

    @staticmethod
    def protocols(raw: Any) -> dict[str, str]:
        """Broker name -> MQTT version ("auto", "3.1.1", "5"; "embedded" for an embedded broker left on auto: it
        speaks 3.1.1 only), from the raw `brokers:` mapping (rules validate `sub.share` against it)."""
        items = raw.items() if isinstance(raw, dict) else ()
        return {str(n): _protocol(b) for n, b in items if isinstance(b, dict)}


def _protocol(raw: dict[str, Any]) -> str:
    """One raw broker's MQTT version, as `Broker.protocols` tells it."""
    protocol, url = str(raw.get("protocol", "auto")), str(raw.get("url", ""))
    return "embedded" if protocol == "auto" and (url == "embedded" or url.startswith("embedded:")) else protocol


class Model(ModelMixin, Strict):  # source, where
    """Exactly one source: `path` (a folder, .zip, .tar.gz or .tgz; relative to the config file), or `url` and/or
    `urls` (per machine; `url` serves the others). `sha256` / `md5` (hex; md5 also as base64 of the raw digest, as
    the old configs write it) are checked when the archive is fetched (workers, `pipeline up`, `models fetch`,
    `check --fetch`), never when the file is loaded: loading stays offline.

    A url model needs a checksum and https:// urls; `insecure: true` allows both plain http:// and no checksum,
    nothing else. Whether a checksum mapping names this machine's architecture is checked when fetching (the
    file may be checked on another machine)."""

    path: Path | None = None
    url: str | None = None
    urls: dict[Literal["amd64", "arm64"], str] | None = None
    sha256: str | dict[Literal["amd64", "arm64"], str] | None = None
    md5: str | dict[Literal["amd64", "arm64"], str] | None = None
    insecure: bool = False  # a url model: accept plain http:// and no checksum
    params: dict[str, Any] = {}
    pool: int = Field(1, ge=1, le=64)  # processes serving the rules of this model that say `workers: shared`

    @field_validator("path")
    @classmethod
    def _exists(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        if v is None:
            return v
        p = v if v.is_absolute() else Path((info.context or {}).get("base", ".")) / v
        try:
            p = p.resolve()
            found = p.exists()
        except (OSError, ValueError) as e:  # a name too long, a NUL byte
            raise ValueError(f"not a usable path: {e}") from None
        if not found:
            raise ValueError(f"no such file or folder: {p}")
        if p.is_file() and not p.name.endswith((".zip", ".tar.gz", ".tgz")):
            raise ValueError("a model is a folder or a .zip holding index.py (or a .tar.gz or .tgz archive)")
        return p

    @field_validator("url", "urls")
    @classmethod
    def _http(cls, v: str | dict[str, str] | None) -> str | dict[str, str] | None:
        for url in [v] if isinstance(v, str) else (v or {}).values():
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:  # value shown without credentials
                raise PydanticCustomError("url", "expected an http:// or https:// url", {"value": redact(url)})
        return v or None

    @field_validator("sha256", "md5")
    @classmethod
    def _digest(cls, v: str | dict[str, str] | None, info: ValidationInfo) -> str | dict[str, str] | None:
        check = parse_sha256 if info.field_name == "sha256" else parse_md5
        for text in v.values() if isinstance(v, dict) else [v] if v else []:
            check(text)  # ValueError names the bad digest
        return v or None

    @model_validator(mode="after")
    def _one_source(self) -> Model:
        remote = bool(self.url or self.urls)
        if (self.path is not None) == remote:
            got = "both path and url/urls" if remote else "neither path nor url/urls"
            raise PydanticCustomError("model_source", "give exactly one source: path, or url / urls ({got})",
                                      {"got": got})
        if self.path is not None and self.path.is_dir() and (self.sha256 or self.md5):
            raise PydanticCustomError("model_source", "a checksum applies to an archive, and path is a folder",
                                      {"at": "sha256" if self.sha256 else "md5"})
        if self.path is not None and self.insecure:
            raise PydanticCustomError("model_source", "insecure applies to url models, and this one has a path",
                                      {"at": "insecure", "value": True})
        return self

    @model_validator(mode="after")
    def _integrity(self) -> Model:
        if self.path is not None or self.insecure:
            return self
        urls = [("url", self.url)] if self.url else []
        for at, url in [*urls, *((f"urls.{arch}", u) for arch, u in (self.urls or {}).items())]:
            if urlsplit(url).scheme == "http":
                raise PydanticCustomError(
                    "insecure", "plain http: anyone on the way can change the archive; give an https:// url, or "
                    "insecure: true to accept it", {"at": at, "value": redact(url)})
        if not (self.sha256 or self.md5):
            raise PydanticCustomError(
                "insecure", "a url model needs a checksum: give sha256 (the archive's, in hex), or insecure: true "
                "to run whatever the server sends", {"at": "sha256"})
        return self


class Packages(PackagesMixin, Strict):  # limits()
    """Limits on fetching and unpacking model archives (pipeline.models.packages.Limits)."""

    max_bytes: ByteSize = ByteSize(512 << 20)  # unpacked size of one archive, and the most a download may carry
    max_files: int = Field(10_000, ge=1)  # entries of one archive
    connect_timeout: Seconds = 10.0
    read_timeout: Seconds = 60.0  # silence allowed while reading a response
    retries: int = Field(3, ge=0, le=20)  # further attempts after a failed download
    backoff: Seconds = 1.0  # before the first retry, doubled before each next one
