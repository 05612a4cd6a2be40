"""Model integrity against real loopback HTTP and HTTPS servers and real archives: https and a checksum unless
`insecure: true`, checksum mappings that must name this machine, redirects only to http(s) and never from https
to http, tar headers checked against the limits before tarfile reads them (the process's peak RSS measured in
a subprocess), and a cache private to its user whatever the umask. Every refusal names what it refused and
why, and leaves nothing in the cache."""

from __future__ import annotations

import gzip
import http.server
import io
import os
import ssl
import stat
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from test_packages import FAST, GOOD, INDEX, FileServer, digests, leftovers, tar_bytes, zip_bytes, zip_with_tool
from test_tls import make_certs

from pipeline.commands.models import model_notes
from pipeline.config import load as config
from pipeline.errors import ModelLoadError
from pipeline.models.packages import Limits, ModelSource, machine_arch, resolve

ROOT = Path(__file__).parent.parent
OTHER_ARCH = "arm64" if machine_arch() == "amd64" else "amd64"
RSS_LIMIT = 100 << 20


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tls")
    make_certs(d)
    return d


@pytest.fixture
def tls_files(certs: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FileServer]:
    """An HTTPS file server whose CA this process trusts (SSL_CERT_FILE, read by OpenSSL for every context)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs / "server.pem", certs / "server.key")
    monkeypatch.setenv("SSL_CERT_FILE", str(certs / "ca.pem"))
    server = FileServer(tls=context)
    yield server
    server.stop()


@pytest.fixture
def files() -> Iterator[FileServer]:
    server = FileServer()
    yield server
    server.stop()


# ------------------------------------------------------------------------------ https, checksums, insecure

def test_https_with_a_sha256_is_fetched_and_verified(tls_files, tmp_path):
    url = tls_files.serve("/m.zip", GOOD)
    folder = resolve("m", ModelSource(url=url, sha256=digests(GOOD)[0]), tmp_path, FAST)
    assert (folder / "index.py").read_bytes() == INDEX and tls_files.hits == ["/m.zip"]


@pytest.mark.parametrize(("scheme", "given", "reason"), [
    ("http", {"sha256": "sha"}, "refused: plain http (give an https:// url, or insecure: true)"),
    ("https", {}, "refused: no checksum (give sha256, or insecure: true)"),
    ("https", {"sha256": {OTHER_ARCH: "sha"}}, "sha256 has no entry for this machine"),
    ("https", {"md5": {OTHER_ARCH: "md5"}}, "md5 has no entry for this machine"),
])
def test_an_unprotected_url_is_refused_before_any_download(files, tls_files, tmp_path, scheme, given, reason):
    server = tls_files if scheme == "https" else files
    url = server.serve("/m.zip", GOOD).replace("://", "://edge:s3cret@")
    sha, _, md5 = digests(GOOD)
    sums = {k: ({a: {"sha": sha, "md5": md5}[x] for a, x in v.items()} if isinstance(v, dict)
                else {"sha": sha, "md5": md5}[v]) for k, v in given.items()}
    with pytest.raises(ModelLoadError) as e:
        resolve("m", ModelSource(url=url, **sums), tmp_path, FAST)
    assert str(e.value).startswith(f"model 'm': {server.url('/m.zip')} refused: ") and reason in str(e.value)
    assert "s3cret" not in str(e.value)
    assert server.hits == [] and leftovers(tmp_path, "m") == []
    folder = resolve("m", ModelSource(url=url, insecure=True, **sums), tmp_path, FAST)  # what insecure allows
    assert (folder / "index.py").is_file() and server.hits == ["/m.zip"]


def test_insecure_still_checks_the_checksums_it_is_given(files, tmp_path):
    url = files.serve("/m.zip", GOOD)
    with pytest.raises(ModelLoadError, match="checksum mismatch"):
        resolve("m", ModelSource(url=url, sha256="0" * 64, insecure=True), tmp_path, FAST)
    assert leftovers(tmp_path, "m") == []


def native(tmp_path: Path, models: dict) -> Path:
    doc = {"brokers": {"local": {"url": "mqtt://127.0.0.1:1883"}}, "models": models,
           "rules": [{"name": "r", "sub": {"broker": "local", "topic": "in"}, "model": next(iter(models)),
                      "pub": {"broker": "local", "topic": "out"}}]}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(doc))
    return tmp_path / "p.yaml"


def test_check_warns_of_weak_md5_insecure_models_and_a_mapping_without_this_machine(tmp_path):
    path = native(tmp_path, {
        "weak": {"url": "https://f/a.zip", "md5": "pZ4DJ+YhYM9ppHD+VhLi+A=="},
        "open": {"url": "http://user:pw@f/b.zip", "insecure": True},
        "elsewhere": {"url": "https://f/c.zip", "sha256": {OTHER_ARCH: "a" * 64}},
        "fine": {"url": "https://f/d.zip", "sha256": {"amd64": "a" * 64, "arm64": "b" * 64}}})
    notes = model_notes(config.load(path))
    assert notes == [  # in the order of the file
        f"warning: models.elsewhere.sha256: no entry for this machine ({machine_arch()}): fetching the model here is "
        "refused unless insecure",
        "warning: models.open.insecure: the model is fetched with plain http and no checksum: anyone on the way or "
        "on the server can change what runs",
        "warning: models.weak.md5: md5 is weak (archives with the same MD5 can be made): give sha256"]
    out = subprocess.run([sys.executable, "-m", "pipeline", "check", "-c", str(path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and all(n in out.stdout for n in notes) and "pw" not in out.stdout


# ------------------------------------------------------------------------------------------------ redirects

def redirect(to: str) -> object:
    def answer(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(302)
        h.send_header("Location", to)
        h.send_header("Content-Length", "0")
        h.end_headers()
    return answer


def test_a_redirect_from_https_to_http_is_refused_naming_both_urls(files, tls_files, tmp_path):
    target = files.serve("/m.zip", GOOD).replace("://", "://edge:s3cret@")
    url = tls_files.serve("/moved.zip", redirect(target))
    with pytest.raises(ModelLoadError) as e:
        resolve("m", ModelSource(url=url, sha256=digests(GOOD)[0]), tmp_path, FAST)
    assert f"model 'm': redirect from {url} to {files.url('/m.zip')} refused: from https to plain http" == str(e.value)
    assert files.hits == [] and leftovers(tmp_path, "m") == []


@pytest.mark.parametrize("target", ["ftp://127.0.0.1/m.zip", "file:///etc/passwd", "gopher://127.0.0.1/m"])
def test_a_redirect_to_anything_but_http_is_refused(files, tmp_path, target):
    url = files.serve("/moved.zip", redirect(target))
    with pytest.raises(ModelLoadError) as e:
        resolve("m", ModelSource(url=url, insecure=True), tmp_path, FAST)
    scheme = target.partition(":")[0]
    assert f"redirect from {url} to {target} refused: a model is downloaded only over http(s), not {scheme}" in str(
        e.value)
    assert leftovers(tmp_path, "m") == []


def test_redirects_within_https_and_up_from_http_are_followed(files, tls_files, tmp_path):
    secure = tls_files.serve("/m.zip", GOOD)
    hop = tls_files.serve("/hop.zip", redirect("/m.zip"))
    folder = resolve("a", ModelSource(url=hop, sha256=digests(GOOD)[0]), tmp_path, FAST)
    up = files.serve("/up.zip", redirect(secure))
    other = resolve("b", ModelSource(url=up, sha256=digests(GOOD)[0], insecure=True), tmp_path, FAST)
    assert (folder / "index.py").is_file() and (other / "index.py").is_file()
    assert tls_files.hits == ["/hop.zip", "/m.zip", "/m.zip"] and files.hits == ["/up.zip"]


# ----------------------------------------------------------------------------------------- tar header bombs

def header(kind: bytes, size: int, name: str = "././@LongLink") -> bytes:
    """One tar header block of type `kind` declaring `size` bytes of contents (tarfile's own encoder)."""
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, size
    return info.tobuf(tarfile.GNU_FORMAT)


def gz_bomb(path: Path, kind: bytes, declared: int, zeros: int) -> Path:
    """A .tar.gz: one header declaring `declared` bytes, then `zeros` zero bytes (that compress to nearly nothing)."""
    with gzip.open(path, "wb", compresslevel=9) as out:
        out.write(header(kind, declared))
        for _ in range(zeros >> 20):
            out.write(bytes(1 << 20))
    return path


KINDS = {"long-name": (tarfile.GNUTYPE_LONGNAME, "GNU long-name ('L')"),
         "long-link": (tarfile.GNUTYPE_LONGLINK, "GNU long-link ('K')"),
         "pax": (tarfile.XHDTYPE, "pax ('x')"), "pax-global": (tarfile.XGLTYPE, "pax global ('g')")}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_tar_header_declaring_gigabytes_is_refused_before_it_is_read(files, tmp_path, kind):
    code, label = KINDS[kind]
    bomb = gz_bomb(tmp_path / "bomb.tar.gz", code, 6 << 30, 1 << 20)
    assert bomb.stat().st_size < 8 << 10
    url = files.serve("/bomb.tgz", bomb.read_bytes())
    with pytest.raises(ModelLoadError) as e:
        resolve("bomb", ModelSource(url=url, sha256=digests(bomb.read_bytes())[0], insecure=True), tmp_path, FAST)
    assert str(e.value) == (f"model 'bomb': {url}: archive refused: a {label} header declares {6 << 30} bytes (at "
                            f"most {1 << 20} bytes of extended headers per member)")
    assert leftovers(tmp_path, "bomb") == []


def test_a_member_declaring_more_than_max_bytes_is_refused_before_it_is_read(tmp_path):
    with gzip.open(tmp_path / "big.tar.gz", "wb") as out:
        out.write(header(tarfile.REGTYPE, 3 << 30, "pkg/weights.bin") + bytes(4096))
    with pytest.raises(ModelLoadError) as e:
        resolve("m", ModelSource(path=tmp_path / "big.tar.gz"), tmp_path / "data", Limits(max_bytes=1 << 30))
    assert str(e.value) == (f"model 'm': {tmp_path / 'big.tar.gz'}: archive refused: 'pkg/weights.bin' declares "
                            f"{3 << 30} bytes, more than {1 << 30} (max_bytes)")
    assert leftovers(tmp_path / "data", "m") == []


PEAK = """
import sys
from pathlib import Path
def peak():
    return next(int(l.split()[1]) << 10 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
try:
    if sys.argv[1] == "guarded":
        from pipeline.errors import ModelLoadError
        from pipeline.models.packages import Limits, unpack
        try:
            unpack(Path(sys.argv[2]), Path(sys.argv[3]), Limits())
        except ModelLoadError as e:
            print(e, file=sys.stderr)
    else:
        import tarfile
        tarfile.open(sys.argv[2]).close()
except Exception as e:
    print(type(e).__name__, e, file=sys.stderr)
print(peak())
"""


def peak_rss(*args: str) -> tuple[int, str]:
    out = subprocess.run([sys.executable, "-c", PEAK, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return int(out.stdout), out.stderr


def test_the_header_bomb_is_refused_without_the_rss_passing_100_mb(tmp_path):
    bomb = gz_bomb(tmp_path / "bomb.tar.gz", tarfile.GNUTYPE_LONGNAME, 6 << 30, 200 << 20)
    assert bomb.stat().st_size < 400 << 10
    rss, said = peak_rss("guarded", str(bomb), str(tmp_path / "out"))
    assert "archive refused: a GNU long-name ('L') header declares 6442450944 bytes" in said
    assert rss < RSS_LIMIT, f"peak RSS {rss >> 20} MiB"
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    unguarded, _ = peak_rss("tarfile", str(bomb))  # the same file read by tarfile alone: what the check prevents
    assert unguarded > RSS_LIMIT, f"peak RSS {unguarded >> 20} MiB"


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_long_names_and_pax_records_of_a_real_archive_still_unpack(tmp_path, fmt):
    name = "pkg/" + "深层目录/" * 30 + "weights.bin"
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:xz", format=fmt) as tar:
        for member, data in (("pkg/index.py", INDEX), (name, b"w" * 5000)):
            info = tarfile.TarInfo(member)
            info.size, info.pax_headers = len(data), {"comment": "x" * 3000} if fmt == tarfile.PAX_FORMAT else {}
            tar.addfile(info, io.BytesIO(data))
    archive = tmp_path / "m.tgz"
    archive.write_bytes(out.getvalue())  # xz inside a .tgz name: the compression is read from the data
    folder = resolve("m", ModelSource(path=archive), tmp_path / "data", FAST)
    assert (folder / name.removeprefix("pkg/")).read_bytes() == b"w" * 5000


# ------------------------------------------------------------------------------------------- file modes

def modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.lstat().st_mode) for p in [root, *root.rglob("*")]
            if not p.is_symlink()}


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_the_cache_is_private_whatever_the_umask(files, tmp_path, kind):
    members = {"pkg/index.py": INDEX, "pkg/data/deep/w.bin": b"1", "pkg/bin/tool": b"#!/bin/sh\n"}
    if kind == "zip":
        archive = zip_bytes(members)
    else:
        archive = tar_bytes([(n, None, d) for n, d in members.items()])
    old = os.umask(0o022)
    try:
        resolve("m", ModelSource(url=files.serve("/m", archive), sha256=digests(archive)[0], insecure=True),
                tmp_path / "data", FAST)
    finally:
        os.umask(old)
    found = modes(tmp_path / "data" / "models")
    folders = {p for p in found if (tmp_path / "data" / "models" / p).is_dir()}
    assert {found[p] for p in folders} == {0o700}, found
    assert {found[p] for p in found if p not in folders} == {0o600}, found
    assert any(p.endswith(".source.json") for p in found) and any(p.endswith("w.bin") for p in found)


def test_executable_members_stay_executable_for_their_user_only(files, tmp_path):
    old = os.umask(0o022)
    try:
        folder = resolve("m", ModelSource(url=files.serve("/x.zip", zip_with_tool()), insecure=True), tmp_path, FAST)
    finally:
        os.umask(old)
    assert stat.S_IMODE((folder / "bin" / "tool").stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / "index.py").stat().st_mode) == 0o600
