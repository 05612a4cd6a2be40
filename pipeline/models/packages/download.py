"""Downloading one archive with urllib: connect and read timeouts, an HTTP status check, retries with
exponential backoff on failures that may pass (network errors, HTTP 5xx, 408, 429, a cut-off body), a size
cap, and a rich progress bar when stderr is a terminal. Credentials in the url (`user:pass@host`) are sent
as HTTP basic auth (not to redirect targets) and never appear in a message. Redirects are followed only to
http:// and https:// urls, and never from https:// to http://."""

from __future__ import annotations

import base64
import contextlib
import http.client
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote, urljoin, urlsplit

from pipeline.errors import ModelLoadError, PipelineError
from pipeline.models.packages.sources import Limits, redact

_CHUNK = 1 << 16


class _Retry(PipelineError):
    """A failure another attempt may not meet."""


def download(url: str, into: Path, limits: Limits, progress: bool = False) -> Path:
    """Download `url` into a new temporary file inside the folder `into`; return its path."""
    shown = redact(url)
    if urlsplit(url).scheme not in ("http", "https"):
        raise ModelLoadError(f"cannot download {shown}: only http:// and https:// urls are supported")
    request = _request(url)
    attempts = max(1, limits.retries + 1)
    reason = ""
    for attempt in range(attempts):
        if attempt:
            time.sleep(limits.backoff * 2 ** (attempt - 1))
        try:
            return _attempt(request, shown, into, limits, progress)
        except _Retry as e:
            reason = str(e)
    raise ModelLoadError(f"download of {shown} failed after {attempts} attempt(s): {reason}")


def _request(url: str) -> urllib.request.Request:
    parts = urlsplit(url)
    request = urllib.request.Request(redact(url), headers={"User-Agent": "edge-pipeline"})
    if parts.username is not None:
        token = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        request.add_unredirected_header("Authorization", "Basic " + base64.b64encode(token).decode())
    return request


def _attempt(request: urllib.request.Request, shown: str, into: Path, limits: Limits, progress: bool) -> Path:
    fd, name = tempfile.mkstemp(dir=into, prefix=".download-")
    try:
        with os.fdopen(fd, "wb") as out, _open(request, shown, limits) as response:
            _copy(response, out, shown, limits, progress)
        return Path(name)
    except BaseException:
        os.unlink(name)
        raise


def _open(request: urllib.request.Request, shown: str, limits: Limits) -> Any:
    try:
        response = _opener(limits.read_timeout).open(request, timeout=limits.connect_timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code >= 500 or e.code in (408, 429):
            raise _Retry(f"HTTP {e.code} {e.reason}") from None
        raise ModelLoadError(f"download of {shown} failed: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise _Retry(str(e.reason)) from None
    except (OSError, http.client.HTTPException) as e:
        raise _Retry(f"{type(e).__name__}: {e}") from None
    if response.status != 200:
        response.close()
        raise ModelLoadError(f"download of {shown} failed: HTTP {response.status} (expected 200)")
    return response


def _copy(response: Any, out: BinaryIO, shown: str, limits: Limits, progress: bool) -> None:
    length = response.headers.get("Content-Length", "")
    total = int(length) if length.isdigit() else None
    too_big = f"download of {shown} refused: larger than {limits.max_bytes} bytes (max_bytes)"
    if total is not None and total > limits.max_bytes:
        raise ModelLoadError(too_big)
    got = 0
    with _bar(total, shown, progress) as advance:
        while chunk := _read(response):
            got += len(chunk)
            if got > limits.max_bytes:
                raise ModelLoadError(too_big)
            out.write(chunk)
            advance(len(chunk))
    if total is not None and got != total:
        raise _Retry(f"the connection closed after {got} of {total} bytes")


def _read(response: Any) -> bytes:
    try:
        return response.read(_CHUNK)
    except (OSError, http.client.HTTPException) as e:
        raise _Retry(f"reading the response failed: {type(e).__name__}: {e}") from None


@contextlib.contextmanager
def _bar(total: int | None, label: str, enabled: bool) -> Iterator[Callable[[int], None]]:
    if not (enabled and sys.stderr.isatty()):
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def _opener(read_timeout: float) -> urllib.request.OpenerDirector:
    """urllib applies one timeout to connecting and reading; these handlers switch to `read_timeout` once
    the connection is open."""

    class ReadTimeout:
        """A handler mixin whose connections get `read_timeout` on their socket once connected."""

        def do_open(self, http_class: Any, req: Any, **kw: Any) -> Any:
            class Connection(http_class):  # type: ignore[misc, valid-type]
                """urllib's connection class, with the read timeout set after connecting."""

                def connect(self) -> None:
                    super().connect()
                    self.sock.settimeout(read_timeout)

            return super().do_open(Connection, req, **kw)  # type: ignore[misc]

    class HTTP(ReadTimeout, urllib.request.HTTPHandler):
        """http:// with the read timeout."""

    class HTTPS(ReadTimeout, urllib.request.HTTPSHandler):
        """https:// with the read timeout."""

    return urllib.request.build_opener(HTTP(), HTTPS(), _Redirects())


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Refuses a redirect to anything but http(s), and from https to http, naming both urls."""

    def http_error_302(self, req: Any, fp: Any, code: int, msg: str, headers: Any) -> Any:
        location = headers.get("location") or headers.get("uri")
        if location:
            target = urljoin(req.full_url, location.strip())
            reason = _redirect_refused(req.full_url, target)
            if reason:
                fp.close()
                raise ModelLoadError(f"redirect from {redact(req.full_url)} to {redact(target)} refused: {reason}")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def _redirect_refused(source: str, target: str) -> str:
    """Why a redirect from `source` to `target` is refused; '' when it may be followed."""
    scheme = urlsplit(target).scheme.lower()
    if scheme not in ("http", "https"):
        return f"a model is downloaded only over http(s), not {scheme or 'a url without a scheme'}"
    if urlsplit(source).scheme.lower() == "https" and scheme == "http":
        return "from https to plain http"
    return ""
