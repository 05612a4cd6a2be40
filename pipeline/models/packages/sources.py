"""What a model source is (`ModelSource`), the limits that apply to it (`Limits`), and the small pure helpers
around them: choosing the url for this machine, reading checksums as the old configs write them, refusing a
url source that is not integrity-protected, and showing a url without the credentials it may carry.

A url source is fetched only over https:// and with a checksum for this machine's archive, unless it says
`insecure` (which allows plain http:// and a missing checksum). A checksum mapping must name this machine's
architecture; without `insecure`, a missing entry refuses the source instead of skipping the check."""

from __future__ import annotations

import base64
import binascii
import platform
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from pipeline.errors import ModelLoadError

ARCHES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: a local `path` (folder, .zip, .tar.gz, .tgz), or a `url`, or per-machine
    `urls` ({"amd64": ..., "arm64": ...}; `url` is the fallback for other machines). `sha256` (hex) and `md5`
    (hex, or base64 of the raw digest as the old configs carry it) are checked when given; either may also be
    a mapping keyed like `urls` when each machine gets a different archive."""

    path: Path | None = None
    url: str | None = None
    urls: dict[str, str] | None = None
    sha256: str | dict[str, str] | None = None
    md5: str | dict[str, str] | None = None
    insecure: bool = False  # allow plain http:// and no checksum


@dataclass(frozen=True)
class Limits:
    """Bounds on what downloading and unpacking a model may take (bytes, files, time)."""

    max_bytes: int = 512 << 20  # unpacked total of one archive (and the most a download may carry)
    max_files: int = 10_000  # entries of one archive: files, folders and links
    connect_timeout: float = 10.0  # seconds to open the connection (TLS handshake included)
    read_timeout: float = 60.0  # seconds of silence allowed while reading the response
    retries: int = 3  # further attempts after a failed download (network errors, HTTP 5xx/408/429)
    backoff: float = 1.0  # seconds before the first retry, doubled before each next one


def machine_arch(machine: str | None = None) -> str | None:
    """'amd64' or 'arm64' for this machine (or for `machine`, a platform.machine() value); None otherwise."""
    return ARCHES.get((machine or platform.machine()).lower())


def choose_url(source: ModelSource, machine: str | None = None) -> str:
    """The url to download for this machine; raise ModelLoadError when there is none."""
    arch = machine_arch(machine)
    if source.urls and arch in source.urls:
        return source.urls[arch]
    if source.url:
        return source.url
    if source.urls:
        known = ", ".join(sorted(source.urls))
        raise ModelLoadError(f"no url for this machine ({machine or platform.machine()}; urls given for: {known})")
    raise ModelLoadError("the source has neither a path, a url nor urls")


def parse_md5(value: str) -> str:
    """An MD5 digest given as 32 hex digits or as base64 of the 16 raw bytes -> lowercase hex."""
    text = value.strip()
    if re.fullmatch(r"[0-9a-fA-F]{32}", text):
        return text.lower()
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 16:
        raise ValueError(f"md5 {value!r} is neither 32 hex digits nor the base64 of a 16-byte digest")
    return raw.hex()


def parse_sha256(value: str) -> str:
    text = value.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", text):
        raise ValueError(f"sha256 {value!r} is not 64 hex digits")
    return text


def uncovered(source: ModelSource, machine: str | None = None) -> list[str]:
    """The checksum keys given as a mapping without an entry for this machine's architecture."""
    arch = machine_arch(machine) or ""
    return [key for key in ("sha256", "md5") if isinstance(getattr(source, key), dict)
            and arch not in getattr(source, key)]


def check_integrity(source: ModelSource, url: str, machine: str | None = None) -> None:
    """Raise ModelLoadError unless downloading `url` for `source` is integrity-protected (or `insecure`)."""
    if source.insecure:
        return
    shown = redact(url)
    if urlsplit(url).scheme == "http":
        raise ModelLoadError(f"{shown} refused: plain http (give an https:// url, or insecure: true)")
    if not (source.sha256 or source.md5):
        raise ModelLoadError(f"{shown} refused: no checksum (give sha256, or insecure: true)")
    try:
        expected(source, machine)
    except ModelLoadError as e:
        raise ModelLoadError(f"{shown} refused: {e}") from None


def expected(source: ModelSource, machine: str | None = None) -> tuple[str | None, str | None]:
    """(sha256 hex, md5 hex) the archive for this machine must have; None where nothing is expected. A checksum
    mapping without this machine's architecture raises ModelLoadError unless the source is `insecure`."""
    arch = machine_arch(machine) or ""
    missing = uncovered(source, machine)
    if missing and not source.insecure:
        names = ", ".join(sorted(getattr(source, missing[0])))
        raise ModelLoadError(f"{missing[0]} has no entry for this machine ({machine or platform.machine()}; "
                             f"given for: {names}): give one, or insecure: true to fetch it unchecked")
    sha = source.sha256.get(arch) if isinstance(source.sha256, dict) else source.sha256
    md5 = source.md5.get(arch) if isinstance(source.md5, dict) else source.md5
    try:
        return (parse_sha256(sha) if sha else None), (parse_md5(md5) if md5 else None)
    except ValueError as e:
        raise ModelLoadError(str(e)) from None


def md5_text(hex_digest: str, like: str | None) -> str:
    """An MD5 digest shown the way the config wrote the expected one: 'base64 (hex)' or 'hex'."""
    if like is None or re.fullmatch(r"\s*[0-9a-fA-F]{32}\s*", like):
        return hex_digest
    return f"{base64.b64encode(bytes.fromhex(hex_digest)).decode()} ({hex_digest})"


def redact(url: str) -> str:
    """The url without the user:password@ it may carry, fit for messages and records."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
