"""`pipeline control` as a process (real gunicorn over TCP): DNS rebinding refused, HTTPS, and slow clients
that cannot starve /healthz. No stack runs behind it: /healthz and /stages answer all the same.
"""

from __future__ import annotations

import http.client
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
from conftest import HERE, free_port, wait_port
from gunicorn.config import Config as GunicornConfig
from gunicorn.workers import gthread
from test_tls import make_certs

from pipeline.commands import cli, status
from pipeline.config import load as config
from pipeline.control import worker
from pipeline.supervision import reload

CONFIG = """
brokers:
  local: {url: "mqtt://127.0.0.1:1"}
models:
  probe: {path: MODELS/probe}
rules:
  - name: r
    sub: {broker: local, topic: "a/+"}
    model: probe
    pub: {broker: local, topic: "b/{1}"}
control: CONTROL
"""
TOKEN = "tok-0123456789abcdef-limits"


class Control:
    """`pipeline control -c FILE` on a free port of 127.0.0.1 (or of every address with `listen_all`)."""

    def __init__(self, d: Path, control: str, listen_all: bool = False) -> None:
        self.port = free_port()
        listen = f"{'0.0.0.0' if listen_all else '127.0.0.1'}:{self.port}"
        (d / "pipeline.yaml").write_text(CONFIG.replace("MODELS", str(HERE / "models"))
                                         .replace("CONTROL", control.replace("LISTEN", listen)))
        self.log = d / "control.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "pipeline", "control", "-c", str(d / "pipeline.yaml"),
                                      "--run-dir", str(d / "run")], stdout=self.log.open("wb"),
                                     stderr=subprocess.STDOUT)
        wait_port(self.port, 30)

    def get(self, path: str, host: str | None = None, timeout: float = 10) -> tuple[int, dict]:
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        c.putrequest("GET", path, skip_host=host is not None)
        if host is not None:
            c.putheader("Host", host)
        c.endheaders()
        r = c.getresponse()
        return r.status, orjson.loads(r.read())

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(15)


@pytest.fixture
def control_factory(tmp_path: Path) -> Iterator[Callable[..., Control]]:
    started: list[Control] = []

    def make(control: str, listen_all: bool = False) -> Control:
        started.append(Control(tmp_path, control, listen_all))
        return started[-1]

    yield make
    for c in started:
        c.stop()


def test_the_gthread_internals_the_worker_relies_on_are_there(tmp_path):
    import gunicorn

    missing = [n for n in ("handle", "handle_request", "finish_request", "run", "murder_pending")
               if not callable(getattr(gthread.ThreadWorker, n, None))]
    missing += [] if getattr(gthread, "_DEFER", None) is not None else ["_DEFER"]
    assert not missing, (f"gunicorn {gunicorn.__version__} lacks {', '.join(missing)} of gunicorn.workers.gthread, "
                         "which pipeline/control/worker.py relies on: it was written for gunicorn 27.0.x, the "
                         "version setup.cfg pins")
    a, b = socket.socketpair()
    conn = gthread.TConn(GunicornConfig(), a, ("127.0.0.1", 1), ("127.0.0.1", 2))
    assert (conn.sock, conn.parser, conn.data_ready, conn.is_http2, conn.initialized) == (a, None, False, False, False)
    conn.init()
    assert conn.parser.unreader.buf.getvalue() == b""
    conn.close()
    b.close()
    log = type("Log", (), {"debug": print, "info": print, "warning": print})()
    w = worker.Worker(1, 0, [], None, 30, GunicornConfig(), log)
    assert (w.nr_conns, w.poller) == (0, None)
    w.tmp.close()


def test_the_arbiter_internals_the_server_relies_on_are_there():
    """pipeline/control/server.py does for its one worker what gunicorn's arbiter does in the child after fork."""
    import gunicorn
    from gunicorn import sock

    cfg = GunicornConfig()
    log = cfg.logger_class(cfg)
    w = cfg.worker_class(1, 0, [], None, 30, cfg, log)
    missing = [name for name, there in (
        ("gunicorn.sock.create_sockets", callable(getattr(sock, "create_sockets", None))),
        ("Config.logger_class", callable(cfg.logger_class)),
        ("Worker.init_process", callable(getattr(w, "init_process", None))),
        ("Worker.booted", hasattr(w, "booted")),
        ("Worker.tmp", hasattr(getattr(w, "tmp", None), "close")),
    ) if not there]
    w.tmp.close()
    assert not missing, (f"gunicorn {gunicorn.__version__} lacks {', '.join(missing)}, which "
                         "pipeline/control/server.py relies on: it was written for gunicorn 27.0.x, the version "
                         "setup.cfg pins")


def test_dns_rebinding_is_refused_while_requests_by_address_work(control_factory):
    c = control_factory("{listen: LISTEN}", listen_all=True)
    status, doc = c.get("/stages", host=f"rebind.attacker.example:{c.port}")
    assert status == 421
    assert "rebind.attacker.example" in doc["description"] and "control.allowed_hosts" in doc["description"]
    assert c.get("/healthz", host="evil.example")[0] == 421  # the probes' path too
    assert c.get("/stages")[0] == 200  # Host: 127.0.0.1:PORT, as curl sends it
    assert c.get("/stages", host=f"localhost:{c.port}")[0] == 200
    assert c.get("/healthz", host=f"[::1]:{c.port}")[0] == 200
    with socket.create_connection(("127.0.0.1", c.port), timeout=10) as s:  # HTTP/1.0, no Host: no browser
        s.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        assert s.makefile("rb").readline().split()[1] == b"200"
    out = c.log.read_text()
    assert f"control listens on 0.0.0.0:{c.port} without TLS" in out and "control.tls" in out
    assert "without a token" in out and "control.token" in out


def slow_client(port: int, stop: threading.Event, closed: list[float]) -> None:
    """Sends a request head a byte every 0.3 s, forever; on being closed, notes when and connects again."""
    while not stop.is_set():
        t0 = time.monotonic()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                for ch in b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 1000:
                    s.send(bytes([ch]))
                    if stop.wait(0.3):
                        return
        except OSError:
            closed.append(time.monotonic() - t0)


def idle_client(port: int, stop: threading.Event, ask: bytes) -> None:
    """Connects, sends `ask` (maybe nothing), then neither sends nor closes until the server closes."""
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(ask)
                while s.recv(4096) and not stop.is_set():
                    pass
        except OSError:
            pass


def healthz_worst(c: Control, n: int) -> float:
    worst = 0.0
    for _ in range(n):
        t0 = time.monotonic()
        assert c.get("/healthz", timeout=30) == (200, {"status": "ok"})
        worst = max(worst, time.monotonic() - t0)
        time.sleep(0.3)
    return worst


def test_slow_and_idle_clients_cannot_starve_healthz(control_factory):
    """Many more slow clients than threads, idle connections, and clients that hold a closing connection
    open: /healthz still answers well within the liveness probe's timeoutSeconds (3)."""
    c = control_factory("{listen: LISTEN}")
    stop, closed = threading.Event(), []
    clients = [threading.Thread(target=slow_client, args=(c.port, stop, closed)) for _ in range(24)]
    clients += [threading.Thread(target=idle_client, args=(c.port, stop, ask)) for _ in range(12)
                for ask in (b"", b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")]
    for t in clients:
        t.start()
    try:
        time.sleep(3)
        worst = healthz_worst(c, 10)
    finally:
        stop.set()
        for t in clients:
            t.join(15)
    assert worst < 2.0, f"/healthz took {worst:.2f}s with slow clients"
    assert closed and max(closed) < worker.HEAD_SECONDS + 3, f"slow heads were not cut: {closed}"


def test_requests_over_the_limits_are_refused_naming_the_limit(control_factory):
    c = control_factory(f"{{listen: LISTEN, token: {TOKEN}}}")
    body = b"x" * 5000
    req = urllib.request.Request(f"http://127.0.0.1:{c.port}/models/probe/reload", data=body, method="POST",
                                 headers={"Authorization": f"Bearer {TOKEN}"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 413
    assert "5000 bytes" in (text := e.value.read().decode()) and "1024" in text
    with socket.create_connection(("127.0.0.1", c.port), timeout=10) as s:
        s.sendall(b"GET /" + b"a" * 3000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = s.makefile("rb").read()
    assert answer.split()[1] == b"414", answer
    assert b"2048" in answer, answer


def closed_by_server(s: socket.socket) -> bool:
    try:
        while s.recv(4096):
            pass
    except ConnectionResetError:
        pass
    return True


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    d = tmp_path / "certs"
    d.mkdir()
    make_certs(d)
    return d


def test_https_with_the_ca_and_plain_http_to_that_port_fails(control_factory, certs, tmp_path):
    c = control_factory(f"{{listen: LISTEN, token: {TOKEN}, protect_reads: true, "
                        "tls: {cert: certs/server.pem, key: certs/server.key}}")
    ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    req = urllib.request.Request(f"https://127.0.0.1:{c.port}/stages", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
        assert r.status == 200 and "stages" in orjson.loads(r.read())
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):  # not the system's CAs
        urllib.request.urlopen(f"https://127.0.0.1:{c.port}/healthz", context=ssl.create_default_context(),
                               timeout=10)
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        c.get("/healthz")
    assert "without TLS" not in c.log.read_text()
    cfg = config.load(tmp_path / "pipeline.yaml")
    assert status.base_url(None, str(cfg.source)) == f"https://127.0.0.1:{c.port}"
    assert reload.http_workers(cfg)() == []  # what SIGHUP reloads read, over HTTPS, trusting control.tls.cert
    assert cli.main(["status", "-c", str(cfg.source)]) == 0  # with the config's token and certificate


def test_a_stalled_tls_handshake_does_not_starve_healthz(control_factory, certs):
    c = control_factory("{listen: LISTEN, tls: {cert: certs/server.pem, key: certs/server.key}}")
    ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    stalled = [socket.create_connection(("127.0.0.1", c.port), timeout=10) for _ in range(16)]
    for s in stalled:
        s.send(b"\x16\x03\x01")  # the start of a ClientHello, and no more
    try:
        time.sleep(1)
        t0 = time.monotonic()
        with urllib.request.urlopen(f"https://127.0.0.1:{c.port}/healthz", context=ctx, timeout=30) as r:
            assert r.status == 200
        took = time.monotonic() - t0
        assert all(closed_by_server(s) for s in stalled)  # by the head deadline
    finally:
        for s in stalled:
            s.close()
    assert took < 3 * worker.HEAD_SECONDS, f"/healthz over TLS took {took:.2f}s"
