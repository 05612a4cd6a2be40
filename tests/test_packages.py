"""Model sources: archives served by a loopback HTTP server, downloaded, verified, cached and unpacked safely."""

from __future__ import annotations

import base64
import hashlib
import http.server
import io
import json
import os
import socket
import ssl
import stat
import sys
import tarfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pipeline.errors import ModelLoadError
from pipeline.models.packages import (
    Limits,
    ModelSource,
    choose_url,
    fetch_all,
    machine_arch,
    parse_md5,
    resolve,
    source_info,
)

FAST = Limits(retries=2, backoff=0.01, connect_timeout=2.0, read_timeout=2.0)
SMALL = Limits(max_bytes=1 << 20, max_files=50, retries=0)
INDEX = b"def handler(event, context):\n    return event\n"
Route = bytes | tuple[int, bytes] | Callable[[http.server.BaseHTTPRequestHandler], None]


class FileServer:
    """A loopback HTTP server of the test's own (HTTPS with `tls`): `routes` maps a path to a body, (status, body)
    or a callable that answers the request itself; `hits` lists the paths asked for."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.routes: dict[str, Route] = {}
        self.hits: list[str] = []
        self.auth: str | None = None  # the Authorization header every request must carry, when set
        self.scheme = "https" if tls else "http"
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        if tls:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def serve(self, path: str, route: Route) -> str:
        self.routes[path] = route
        return self.url(path)

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        if self.thread.is_alive():
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join()


def _handler(files: FileServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server spelling
            files.hits.append(self.path)
            route = files.routes.get(self.path, (404, b"not found"))
            if files.auth is not None and self.headers.get("Authorization") != files.auth:
                route = (401, b"who are you")
            try:
                if callable(route):
                    return route(self)
                status, body = route if isinstance(route, tuple) else (200, route)
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up first, as some tests want
                pass
            return None

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def files() -> Iterator[FileServer]:
    server = FileServer()
    yield server
    server.stop()


def zip_bytes(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    """A zip holding `members` (names kept as given, '../x' and '/x' included) and symlinks `links`."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0)), data, zipfile.ZIP_DEFLATED)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            z.writestr(info, target)
    return out.getvalue()


def tar_bytes(members: list[tuple[str, bytes | str | None, bytes]], mode: str = "w:gz") -> bytes:
    """A tar of (name, type, data-or-linkname) entries; type is a tarfile type such as tarfile.SYMTYPE."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode=mode) as tar:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            info.type = kind if isinstance(kind, bytes) else tarfile.REGTYPE
            if info.type in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = data.decode()
                tar.addfile(info)
            else:
                info.size = len(data) if info.type == tarfile.REGTYPE else 0
                tar.addfile(info, io.BytesIO(data) if info.type == tarfile.REGTYPE else None)
    return out.getvalue()


def plain(**given: object) -> ModelSource:
    """A url source as these tests serve it: over plain http, so `insecure` (its checksums are still checked)."""
    return ModelSource(insecure=True, **given)  # type: ignore[arg-type]


def digests(data: bytes) -> tuple[str, str, str]:
    """sha256 hex, md5 hex, md5 base64 (the old configs' spelling)."""
    md5 = hashlib.md5(data)
    return hashlib.sha256(data).hexdigest(), md5.hexdigest(), base64.b64encode(md5.digest()).decode()


def leftovers(data_dir: Path, name: str) -> list[str]:
    folder = data_dir / "models" / name
    return sorted(os.listdir(folder)) if folder.exists() else []


GOOD = zip_bytes({"index.py": INDEX, "weights.bin": b"\x00" * 1000})


@pytest.mark.parametrize("check", ["sha256", "md5-base64", "md5-hex", "both", "none"])
def test_good_zip_is_verified_and_installed(files, tmp_path, check):
    sha, md5_hex, md5_b64 = digests(GOOD)
    url = files.serve("/group1/M00/good.zip", GOOD)
    given = {"sha256": {"sha256": sha}, "md5-base64": {"md5": md5_b64}, "md5-hex": {"md5": md5_hex},
             "both": {"sha256": sha, "md5": md5_b64}, "none": {}}[check]
    folder = resolve("good", plain(url=url, **given), tmp_path, FAST)
    assert folder == tmp_path / "models" / "good" / sha / "model"
    assert (folder / "index.py").read_bytes() == INDEX and (folder / "weights.bin").stat().st_size == 1000
    assert sorted(os.listdir(folder)) == ["index.py", "weights.bin"]  # the record sits beside, not inside
    info = source_info(folder)
    assert info is not None and (info["url"], info["sha256"], info["md5"]) == (url, sha, md5_hex)
    assert leftovers(tmp_path, "good") == [sha]


@pytest.mark.parametrize("check", ["sha256", "md5"])
def test_wrong_checksum_names_model_url_expected_and_actual(files, tmp_path, check):
    sha, md5_hex, md5_b64 = digests(GOOD)
    url = files.serve("/bad-sum.zip", GOOD)
    wrong = {"sha256": "ab" * 32, "md5": "pZ4DJ+YhYM9ppHD+VhLi+A=="}[check]
    with pytest.raises(ModelLoadError) as e:
        resolve("trend", plain(url=url, **{check: wrong}), tmp_path, FAST)
    msg = str(e.value)
    assert "model 'trend'" in msg and url in msg and "checksum mismatch" in msg
    if check == "sha256":
        assert f"expected sha256 {wrong}, got {sha}" in msg
    else:  # shown as the config wrote it, and in hex
        assert f"expected md5 {wrong} ({parse_md5(wrong)}), got {md5_b64} ({md5_hex})" in msg
    assert leftovers(tmp_path, "trend") == []
    assert files.hits == ["/bad-sum.zip"]  # a mismatch is not retried


UNSAFE = {
    "zip-slip": (zip_bytes({"index.py": INDEX, "../evil.py": b"x"}), "'..'"),
    "zip-slip-deep": (zip_bytes({"index.py": INDEX, "a/../../evil.py": b"x"}), "'..'"),
    "zip-backslash": (zip_bytes({"index.py": INDEX, "..\\evil.py": b"x"}), "'..'"),
    "zip-absolute": (zip_bytes({"index.py": INDEX, "/tmp/evil.py": b"x"}), "absolute"),
    "zip-drive": (zip_bytes({"index.py": INDEX, "C:/evil.py": b"x"}), "absolute"),
    "zip-symlink": (zip_bytes({"index.py": INDEX}, links={"etc": "/etc"}), "symbolic link"),
    "tar-absolute": (tar_bytes([("index.py", None, INDEX), ("/tmp/evil.py", None, b"x")]), "absolute"),
    "tar-slip": (tar_bytes([("index.py", None, INDEX), ("../evil.py", None, b"x")]), "'..'"),
    "tar-symlink-escape": (tar_bytes([("index.py", None, INDEX), ("up", tarfile.SYMTYPE, b"../..")]), "outside"),
    "tar-symlink-absolute": (tar_bytes([("index.py", None, INDEX), ("etc", tarfile.SYMTYPE, b"/etc")]), "outside"),
    "tar-symlink-parent": (tar_bytes([("index.py", None, INDEX), ("up", tarfile.SYMTYPE, b".."),
                                      ("up/evil.py", None, b"x")]), "'up' -> '..' points outside"),
    "tar-write-through-chain": (tar_bytes([("index.py", None, INDEX), ("s2", tarfile.SYMTYPE, b"s1/.."),
                                           ("s1", tarfile.SYMTYPE, b"."), ("s2/evil.py", None, b"x")]),
                                "written through a link leading outside"),
    "tar-link-chain": (tar_bytes([("index.py", None, INDEX), ("s2", tarfile.SYMTYPE, b"s1/.."),
                                  ("s1", tarfile.SYMTYPE, b".")]),
                       "link s2 resolves outside"),
    "tar-hardlink-escape": (tar_bytes([("index.py", None, INDEX), ("h", tarfile.LNKTYPE, b"../../etc/passwd")]),
                            "'..'"),
    "tar-hardlink-absolute": (tar_bytes([("index.py", None, INDEX), ("h", tarfile.LNKTYPE, b"/etc/passwd")]),
                              "absolute"),
    "tar-device": (tar_bytes([("index.py", None, INDEX), ("null", tarfile.CHRTYPE, b"")]), "device"),
    "tar-fifo": (tar_bytes([("index.py", None, INDEX), ("pipe", tarfile.FIFOTYPE, b"")]), "fifo"),
    "not-an-archive": (b"<html>file server error page</html>", "not a zip or tar"),
    "no-index": (zip_bytes({"main.py": INDEX}), "no index.py"),
}


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_unsafe_archive_is_refused_and_leaves_nothing(files, tmp_path, case):
    archive, reason = UNSAFE[case]
    url = files.serve(f"/{case}.bin", archive)
    data = tmp_path / "deep" / "data"
    with pytest.raises(ModelLoadError) as e:
        resolve("m", plain(url=url), data, FAST)
    assert "model 'm'" in str(e.value) and url in str(e.value) and reason in str(e.value)
    assert leftovers(data, "m") == []
    assert not any(p.name == "evil.py" for p in tmp_path.rglob("*"))
    assert files.hits == [f"/{case}.bin"]


def test_symlinks_inside_a_tar_are_kept(files, tmp_path):
    archive = tar_bytes([("pkg/index.py", None, INDEX), ("pkg/data/w.bin", None, b"123"),
                         ("pkg/w.bin", tarfile.SYMTYPE, b"data/w.bin"),
                         ("pkg/copy.bin", tarfile.LNKTYPE, b"pkg/w.bin")])
    folder = resolve("m", plain(url=files.serve("/ok.tgz", archive)), tmp_path, FAST)
    assert (folder / "w.bin").is_symlink() and (folder / "w.bin").read_bytes() == b"123"
    assert (folder / "copy.bin").read_bytes() == b"123" and not (folder / "copy.bin").is_symlink()


def lying_zip(size: int) -> bytes:
    """A zip whose headers declare a 10-byte file that really inflates to `size` bytes."""
    data = bytearray(zip_bytes({"index.py": INDEX, "bomb.bin": b"\x00" * size}))
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        start = 0
        while (start := data.find(signature, start)) >= 0:
            name_len = int.from_bytes(data[start + (26 if offset == 22 else 28):][:2], "little")
            name_at = start + (30 if offset == 22 else 46)
            if data[name_at:name_at + name_len] == b"bomb.bin":
                data[start + offset:start + offset + 4] = (10).to_bytes(4, "little")
            start += 4
    return bytes(data)


BOMBS = {
    "bytes": (zip_bytes({"index.py": INDEX, "bomb.bin": b"\x00" * (2 << 20)}), "max_bytes"),
    "files": (zip_bytes({"index.py": INDEX, **{f"f{i}.txt": b"" for i in range(60)}}), "max_files"),
    "lying-header": (lying_zip(2 << 20), "damaged"),
    "tar-bytes": (tar_bytes([("index.py", None, INDEX), ("bomb.bin", None, b"\x00" * (2 << 20))]), "max_bytes"),
    "tar-files": (tar_bytes([("index.py", None, INDEX), *[(f"f{i}", None, b"") for i in range(60)]]), "max_files"),
    "tar-hardlinks": (tar_bytes([("index.py", None, INDEX), ("w", None, b"\x01" * (400 << 10)),
                                 *[(f"h{i}", tarfile.LNKTYPE, b"w") for i in range(4)]]), "more than its headers"),
}


@pytest.mark.parametrize("case", sorted(BOMBS))
def test_archive_bombs_are_refused(files, tmp_path, case):
    archive, reason = BOMBS[case]
    assert len(archive) < (1 << 20)  # small on the wire
    url = files.serve(f"/{case}.zip", archive)
    with pytest.raises(ModelLoadError) as e:
        resolve("bomb", plain(url=url), tmp_path, SMALL)
    assert reason in str(e.value) and "model 'bomb'" in str(e.value)
    assert leftovers(tmp_path, "bomb") == []


def test_download_larger_than_max_bytes_is_refused(files, tmp_path):
    url = files.serve("/huge.zip", b"\x00" * ((1 << 20) + 1))
    with pytest.raises(ModelLoadError, match=r"larger than 1048576 bytes \(max_bytes\)"):
        resolve("big", plain(url=url), tmp_path, SMALL)
    assert leftovers(tmp_path, "big") == []


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_url_fails_after_retries_quickly(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/m.zip"
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as e:
        resolve("far", plain(url=url, md5="pZ4DJ+YhYM9ppHD+VhLi+A=="), tmp_path, FAST)
    assert time.monotonic() - start < 2.0
    msg = str(e.value)
    assert "model 'far'" in msg and url in msg and "after 3 attempt(s)" in msg and "refused" in msg
    assert leftovers(tmp_path, "far") == []


def test_http_404_fails_at_once(files, tmp_path):
    url = files.url("/gone.zip")
    with pytest.raises(ModelLoadError, match=r"model 'm': download of .*/gone.zip failed: HTTP 404"):
        resolve("m", plain(url=url), tmp_path, FAST)
    assert files.hits == ["/gone.zip"]
    assert leftovers(tmp_path, "m") == []


def test_server_errors_are_retried_with_backoff(files, tmp_path):
    answers = [(503, b"busy"), (500, b"oops")]

    def flaky(h: http.server.BaseHTTPRequestHandler) -> None:
        status, body = answers.pop(0) if answers else (200, GOOD)
        h.send_response(status)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    folder = resolve("m", plain(url=files.serve("/flaky.zip", flaky)), tmp_path, FAST)
    assert (folder / "index.py").is_file() and len(files.hits) == 3


def stalled(h: http.server.BaseHTTPRequestHandler) -> None:
    h.send_response(200)
    h.send_header("Content-Length", "1000")
    h.end_headers()
    h.wfile.write(b"x" * 10)
    h.wfile.flush()
    time.sleep(1.0)


def cut_short(h: http.server.BaseHTTPRequestHandler) -> None:
    h.send_response(200)
    h.send_header("Content-Length", str(len(GOOD)))
    h.end_headers()
    h.wfile.write(GOOD[:100])
    h.close_connection = True


@pytest.mark.parametrize(("answer", "reason"), [(stalled, "timed out"), (cut_short, "closed after 100 of")])
def test_stalled_or_cut_downloads_are_retried_then_refused(files, tmp_path, answer, reason):
    limits = Limits(retries=1, backoff=0.01, read_timeout=0.3)
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match=reason):
        resolve("m", plain(url=files.serve("/slow.zip", answer)), tmp_path, limits)
    assert time.monotonic() - start < 3.0 and len(files.hits) == 2
    assert leftovers(tmp_path, "m") == []


@pytest.mark.parametrize("check", ["sha256", "md5", "none"])
def test_cached_version_is_reused_without_network(files, tmp_path, check):
    sha, _, md5_b64 = digests(GOOD)
    given = {"sha256": {"sha256": sha}, "md5": {"md5": md5_b64}, "none": {}}[check]
    source = plain(url=files.serve("/cached.zip", GOOD), **given)
    first = resolve("c", source, tmp_path, FAST)
    files.stop()
    assert resolve("c", source, tmp_path, FAST) == first
    assert files.hits == ["/cached.zip"]


def test_a_new_checksum_or_url_downloads_again(files, tmp_path):
    sha, _, _ = digests(GOOD)
    resolve("c", plain(url=files.serve("/v1.zip", GOOD), sha256=sha), tmp_path, FAST)
    v2 = zip_bytes({"index.py": INDEX + b"# v2\n"})
    second = resolve("c", plain(url=files.serve("/v2.zip", v2), sha256=digests(v2)[0]), tmp_path, FAST)
    assert (second / "index.py").read_bytes().endswith(b"# v2\n")
    resolve("c", plain(url=files.url("/v1.zip"), sha256=sha), tmp_path, FAST)  # still cached
    assert files.hits == ["/v1.zip", "/v2.zip"]
    assert leftovers(tmp_path, "c") == sorted([sha, digests(v2)[0]])


def test_a_failure_after_a_good_version_keeps_it_and_leaves_no_partial_install(files, tmp_path):
    sha, _, _ = digests(GOOD)
    good = resolve("m", plain(url=files.serve("/good.zip", GOOD), sha256=sha), tmp_path, FAST)
    broken = bytearray(zip_bytes({"index.py": INDEX, "b.bin": os.urandom(5000)}))
    broken[len(broken) // 2] ^= 0xFF  # the second member's data is damaged: unpacking fails half-way
    with pytest.raises(ModelLoadError, match="damaged archive"):
        resolve("m", plain(url=files.serve("/broken.zip", bytes(broken))), tmp_path, FAST)
    assert leftovers(tmp_path, "m") == [sha] and (good / "index.py").is_file()


@pytest.mark.parametrize("layout", ["top-folder", "top-folder+__MACOSX", "flat"])
def test_an_archive_with_one_top_folder_is_unwrapped(files, tmp_path, layout):
    members = {"index.py": INDEX, "w.bin": b"1"} if layout == "flat" else {"trend/index.py": INDEX, "trend/w.bin": b"1"}
    if "__MACOSX" in layout:
        members["__MACOSX/trend/._index.py"] = b"junk"
    folder = resolve("m", plain(url=files.serve("/top.zip", zip_bytes(members))), tmp_path, FAST)
    assert folder.name == ("model" if layout == "flat" else "trend")
    assert sorted(os.listdir(folder)) == ["index.py", "w.bin"]


@pytest.mark.parametrize("suffix", [".tar.gz", ".tgz", ".zip"])
def test_local_archives_are_unpacked_into_the_cache(tmp_path, suffix):
    data = tar_bytes([("pkg/index.py", None, INDEX)]) if suffix != ".zip" else zip_bytes({"pkg/index.py": INDEX})
    archive = tmp_path / f"model{suffix}"
    archive.write_bytes(data)
    folder = resolve("local", ModelSource(path=archive, md5=digests(data)[2]), tmp_path / "data", FAST)
    assert folder == tmp_path / "data" / "models" / "local" / digests(data)[0] / "model" / "pkg"
    assert source_info(folder)["path"] == str(archive)
    with pytest.raises(ModelLoadError, match=rf"model 'local': checksum mismatch for {archive}: expected sha256"):
        resolve("local", ModelSource(path=archive, sha256="0" * 64), tmp_path / "data", FAST)


def test_a_local_folder_is_used_in_place(tmp_path):
    (tmp_path / "m" / "inner").mkdir(parents=True)
    (tmp_path / "m" / "inner" / "index.py").write_bytes(INDEX)
    assert resolve("m", ModelSource(path=tmp_path / "m"), tmp_path / "data") == tmp_path / "m" / "inner"
    assert source_info(tmp_path / "m" / "inner") is None and not (tmp_path / "data").exists()
    with pytest.raises(ModelLoadError, match="model 'm': no such file or folder"):
        resolve("m", ModelSource(path=tmp_path / "nothing"), tmp_path / "data")


def test_urls_are_chosen_by_machine(files, tmp_path):
    urls = {"amd64": "http://x/amd.zip", "arm64": "http://x/arm.zip"}
    assert choose_url(ModelSource(urls=urls), "x86_64") == urls["amd64"]
    assert choose_url(ModelSource(urls=urls), "aarch64") == choose_url(ModelSource(urls=urls), "arm64") == urls["arm64"]
    assert choose_url(ModelSource(urls=urls, url="http://x/any.zip"), "riscv64") == "http://x/any.zip"
    with pytest.raises(ModelLoadError, match=r"no url for this machine \(riscv64; urls given for: amd64, arm64\)"):
        choose_url(ModelSource(urls=urls), "riscv64")
    builds = {arch: zip_bytes({"index.py": INDEX + f"# {arch}\n".encode()}) for arch in ("amd64", "arm64")}
    served = {arch: files.serve(f"/{arch}.zip", data) for arch, data in builds.items()}
    sums = {arch: digests(data)[0] for arch, data in builds.items()}
    folder = resolve("m", plain(urls=served, sha256=sums), tmp_path, FAST)
    assert (folder / "index.py").read_bytes().endswith(f"# {machine_arch()}\n".encode())


def test_credentials_in_the_url_are_sent_and_never_shown(files, tmp_path):
    files.auth = "Basic " + base64.b64encode(b"edge:p@ss").decode()
    url = files.serve("/private.zip", GOOD).replace("http://", "http://edge:p%40ss@")
    folder = resolve("m", plain(url=url), tmp_path, FAST)
    assert "p%40ss" not in json.dumps(source_info(folder)) and source_info(folder)["url"] == files.url("/private.zip")
    with pytest.raises(ModelLoadError) as e:
        resolve("n", plain(url=url.replace("private", "missing")), tmp_path, FAST)
    assert "HTTP 404" in str(e.value) and files.url("/missing.zip") in str(e.value) and "p%40ss" not in str(e.value)
    files.auth = "Basic nobody"
    with pytest.raises(ModelLoadError, match="HTTP 401") as e:
        resolve("o", plain(url=url), tmp_path, FAST)
    assert "edge" not in str(e.value)


def test_fetch_all_reports_each_model(files, tmp_path):
    models = {"ok": plain(url=files.serve("/ok.zip", GOOD)), "gone": plain(url=files.url("/gone.zip")),
              "bad": plain(url=files.serve("/bad.zip", GOOD), sha256="1" * 64)}
    out = fetch_all(models, tmp_path, FAST)
    assert isinstance(out["ok"], Path) and (out["ok"] / "index.py").is_file()
    assert isinstance(out["gone"], ModelLoadError) and "HTTP 404" in str(out["gone"])
    assert isinstance(out["bad"], ModelLoadError) and "checksum mismatch" in str(out["bad"])


@pytest.mark.parametrize(("source", "reason"), [
    (ModelSource(), "neither a path, a url nor urls"),
    (plain(url="ftp://x/m.zip"), "only http:// and https://"),
    (plain(url="http://x/m.zip", md5="not-a-digest"), "neither 32 hex digits nor the base64"),
    (plain(url="http://x/m.zip", sha256="abc"), "not 64 hex digits"),
])
def test_bad_sources_are_refused_before_any_download(tmp_path, source, reason):
    with pytest.raises(ModelLoadError, match=reason):
        resolve("m", source, tmp_path, FAST)


def test_a_model_name_cannot_leave_the_cache(tmp_path):
    with pytest.raises(ModelLoadError, match="a model name is"):
        resolve("../x", plain(url="http://x/m.zip"), tmp_path, FAST)


def zip_with_tool() -> bytes:
    """A model zip holding an executable `bin/tool` (mode 0755) beside `index.py`."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("index.py", INDEX)
        info = zipfile.ZipInfo("bin/tool")
        info.external_attr = (stat.S_IFREG | 0o755) << 16
        z.writestr(info, b"#!/bin/sh\n")
    return out.getvalue()


def test_executable_bits_are_kept(files, tmp_path):
    folder = resolve("m", plain(url=files.serve("/x.zip", zip_with_tool())), tmp_path, FAST)
    assert os.access(folder / "bin" / "tool", os.X_OK) and not os.access(folder / "index.py", os.X_OK)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_progress_bar_is_drawn_on_a_terminal_only(files, tmp_path, monkeypatch):
    url = files.serve("/bar.zip", GOOD)
    monkeypatch.setattr("sys.stderr", Terminal())
    resolve("m", plain(url=url), tmp_path / "a", FAST, progress=True)
    assert "bar.zip" in sys.stderr.getvalue()
    monkeypatch.setattr("sys.stderr", io.StringIO())
    resolve("m", plain(url=url), tmp_path / "b", FAST, progress=True)
    assert sys.stderr.getvalue() == ""
