"""Broker TLS and passwords through `pipeline up`, against a Mosquitto with a certificate made here (openssl CLI).

Listener `in`: TLS (server certificate) + password (given in the url), MQTT 3.1.1. Listener `out`: TLS that also
requires a client certificate + password, MQTT 5. A stack reads from one and publishes to the other; a wrong
password and plain TCP to the TLS port are clear errors; the password (and the private keys) never show anywhere
we write.
"""

from __future__ import annotations

import getpass
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import paho.mqtt.client as mqtt
import pytest
from conftest import Up, free_port, wait_port

PASSWORD = "pw-Zq7-tls-91-secret"
WRONG = "pw-wrong-55-nope"


def openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certs(d: Path) -> None:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, all EC P-256."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl(d, "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test CA",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth"),
                      ("client", "extendedKeyUsage=clientAuth")):
        (d / f"{name}.ext").write_text(f"{ext}\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                                       "authorityKeyIdentifier=keyid\n")
        openssl(d, "req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")


class TlsMosquitto:
    def __init__(self, d: Path) -> None:
        if not shutil.which("mosquitto"):
            pytest.fail("mosquitto is not installed (bash scripts/test.sh installs it with apt-get)")
        self.dir, self.port_in, self.port_out = d, free_port(), free_port()
        make_certs(d)
        subprocess.run(["mosquitto_passwd", "-b", "-c", str(d / "passwd"), "edge", PASSWORD], check=True)
        tls = [f"cafile {d}/ca.pem", f"certfile {d}/server.pem", f"keyfile {d}/server.key"]
        lines = ["per_listener_settings false", "allow_anonymous false", f"password_file {d}/passwd",
                 f"user {getpass.getuser()}", "log_type error", "log_type warning", "log_type notice",
                 f"listener {self.port_in} 127.0.0.1", *tls,
                 f"listener {self.port_out} 127.0.0.1", *tls, "require_certificate true"]
        (d / "mosquitto.conf").write_text("\n".join(lines) + "\n")
        log = (d / "mosquitto.log").open("ab")
        self.proc = subprocess.Popen(["mosquitto", "-c", str(d / "mosquitto.conf")], stdout=log, stderr=log)
        wait_port(self.port_in)
        wait_port(self.port_out)


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsMosquitto]:
    m = TlsMosquitto(tmp_path_factory.mktemp("tls-mosquitto"))
    yield m
    m.proc.terminate()
    m.proc.wait(10)


class Client:
    """A test-side TLS client (CA, password, and the client certificate when `cert`)."""

    def __init__(self, b: TlsMosquitto, port: int, cert: bool, *subs: str) -> None:
        self.got: list[tuple[str, bytes]] = []
        ready = threading.Event()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        files = [str(b.dir / f) for f in ("client.pem", "client.key")] if cert else [None, None]
        self.c.tls_set(str(b.dir / "ca.pem"), *files)
        self.c.username_pw_set("edge", PASSWORD)
        self.c.on_message = lambda _c, _u, m: self.got.append((m.topic, m.payload))
        self.c.on_subscribe = lambda *_a: ready.set()
        self.c.on_connect = lambda c, *_a: c.subscribe([(s, 1) for s in subs]) if subs else ready.set()
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        assert ready.wait(10), "test client could not connect/subscribe"

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


CONFIG = """
brokers:
  in: {url: "URL_IN", CA_IN keepalive: 30}
  out: {url: "mqtts://localhost:PORT_OUT", protocol: 5, ca: tls/ca.pem, cert: tls/client.pem, key: tls/client.key,
        username: edge, password: "${TLS_TEST_PASSWORD}"}
models: {probe: {path: MODELS/probe}}
rules:
  - {name: tls, sub: {broker: in, topic: "in/+"}, model: probe, pub: {broker: out, topic: "out/{1}"}}
control: {listen: CONTROL}
"""


def config_for(b: TlsMosquitto, tmp_path: Path, url_in: str, ca_in: str | None = "tls/ca.pem") -> str:
    shutil.copytree(b.dir, tmp_path / "tls", dirs_exist_ok=True)  # relative paths: resolved next to the config
    url_in = url_in.replace("://", "://edge:${TLS_TEST_PASSWORD}@")  # credentials in the url work too
    return (CONFIG.replace("URL_IN", url_in).replace("PORT_OUT", str(b.port_out))
            .replace("CA_IN", f"ca: {ca_in}," if ca_in else ""))


def secrets_nowhere(up: Up, *secrets: str) -> None:
    """Not in `pipeline up`'s output, in any file of the run directory, in /rules, /stages or `pipeline check`."""
    check = subprocess.run([sys.executable, "-m", "pipeline", "check", "-c", str(up.config)], capture_output=True,
                           text=True, timeout=30)
    texts = [up.output(), check.stdout + check.stderr]
    if up.proc.poll() is None:
        texts += [str(up.get("/rules")[1]), str(up.get("/stages")[1])]
    texts += [p.read_text(errors="replace") for p in up.run_dir.rglob("*") if p.is_file() and p.suffix != ".sock"]
    for secret in secrets:
        assert not any(secret in t for t in texts), "a secret shows"


def wait_problem(up: Up, needle: str, timeout: float = 40.0) -> list[str]:
    deadline = time.monotonic() + timeout
    problems: list[str] = []
    while time.monotonic() < deadline:
        try:
            code, doc = up.get("/readyz")
            problems = doc.get("problems", [])
            if code == 503 and any(needle in p for p in problems):
                return problems
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"/readyz never said {needle!r} (last: {problems}):\n{up.output()}")


def test_tls_and_password_end_to_end(tls_broker, stack_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("TLS_TEST_PASSWORD", PASSWORD)
    up = stack_factory(config_for(tls_broker, tmp_path, f"mqtts://127.0.0.1:{tls_broker.port_in}"),
                       "--log-level", "debug")
    out = Client(tls_broker, tls_broker.port_out, True, "out/#", "pipeline/errors/#")
    src = Client(tls_broker, tls_broker.port_in, False)
    try:
        for seq in range(50):
            src.c.publish(f"in/d{seq % 3}", orjson.dumps({"seq": seq}), qos=1)
        src.c.publish("in/bad", orjson.dumps({"fail": True, "note": PASSWORD[:3]}), qos=1)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(out.got) < 51:
            time.sleep(0.1)
        seqs = sorted(orjson.loads(p)["seq"] for t, p in out.got if t.startswith("out/"))
        assert seqs == list(range(50)), up.output()
        errors = [p for t, p in out.got if t.startswith("pipeline/errors/")]
        assert len(errors) == 1 and orjson.loads(errors[0])["reason"] == "model_error"
        assert PASSWORD.encode() not in b"".join(p for _t, p in out.got), "a secret in a result or error record"
        key_body = (tmp_path / "tls/client.key").read_text().splitlines()[1]
        secrets_nowhere(up, PASSWORD, key_body)
        assert up.get("/rules")[1]["brokers"]["out"]["password_set"] is True
    finally:
        out.close()
        src.close()
    assert up.stop() == 0


def test_wrong_password_is_a_clear_error(tls_broker, stack_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("TLS_TEST_PASSWORD", WRONG)
    up = stack_factory(config_for(tls_broker, tmp_path, f"mqtts://127.0.0.1:{tls_broker.port_in}"), ready=False)
    wait_problem(up, "broker in is refusing the connection (Not authorized)")
    wait_problem(up, "broker out is refusing the connection (")  # MQTT 5: the broker's reason code
    assert "broker in refused the connection: Not authorized" in up.output()
    secrets_nowhere(up, WRONG)


@pytest.mark.parametrize("scheme, ca, logged", [
    ("mqtt", None, "closed the connection before CONNACK (a TLS port? then use mqtts://)"),
    ("mqtts", "tls/client.pem", "certificate verify failed"),  # trusting a certificate that did not sign the broker's
], ids=["plain-tcp-to-tls-port", "wrong-ca"])
def test_tls_mismatch_is_a_clear_error(tls_broker, stack_factory, tmp_path, monkeypatch, scheme, ca, logged):
    monkeypatch.setenv("TLS_TEST_PASSWORD", PASSWORD)
    up = stack_factory(config_for(tls_broker, tmp_path, f"{scheme}://127.0.0.1:{tls_broker.port_in}", ca), ready=False)
    problems = wait_problem(up, "broker in is disconnected")
    deadline = time.monotonic() + 10  # egress may still be in its TLS handshake when ingress has already failed
    while any("broker out" in p for p in problems) and time.monotonic() < deadline:
        time.sleep(0.3)
        problems = up.get("/readyz")[1].get("problems", [])
    assert any("broker in is disconnected" in p for p in problems), problems
    assert all("broker out" not in p for p in problems), "the other broker connects"
    assert logged in up.output()
    secrets_nowhere(up, PASSWORD)


def test_tls_options_need_mqtts(tls_broker, tmp_path, monkeypatch):
    monkeypatch.setenv("TLS_TEST_PASSWORD", PASSWORD)
    path = tmp_path / "pipeline.yaml"
    path.write_text(config_for(tls_broker, tmp_path, f"mqtt://127.0.0.1:{tls_broker.port_in}")
                    .replace("MODELS", str(Path(__file__).parent / "models")).replace("CONTROL", "127.0.0.1:1"))
    out = subprocess.run([sys.executable, "-m", "pipeline", "check", "-c", str(path)], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 2 and "brokers.in.ca: a TLS option needs an mqtts:// url" in out.stderr
    assert PASSWORD not in out.stdout + out.stderr


def test_credentials_in_the_url_are_moved_and_hidden(tmp_path):
    from pipeline.config import load as config

    cfg = config.parse({"brokers": {"b": {"url": f"mqtts://edge:{PASSWORD.replace('-', '%2D')}@h:8883"}},
                        "models": {"m": {"path": str(Path(__file__).parent / "models/probe")}},
                        "rules": [{"name": "r", "sub": {"broker": "b", "topic": "t"}, "model": "m",
                                   "pub": {"broker": "b", "topic": "o"}}]}, tmp_path / "pipeline.yaml")
    b = cfg.brokers["b"]
    assert (b.url, b.username, b.password.get_secret_value()) == ("mqtts://h:8883", "edge", PASSWORD)
    assert PASSWORD not in repr(cfg) + str(cfg.model_dump())


@pytest.mark.parametrize("broker, problem", [
    ({"url": "mqtt://h", "ca": "ca.pem"}, "brokers.b.ca: a TLS option needs an mqtts:// url (url is mqtt://h)"),
    ({"url": "mqtt://h", "insecure": True}, "brokers.b.insecure: a TLS option needs an mqtts:// url"),
    ({"url": "mqtts://h", "key": "ca.pem"}, "brokers.b.key: key is the private key of cert: give cert too"),
    ({"url": "mqtts://h", "ca": "nope.pem"}, "brokers.b.ca: no such file: "),
    ({"url": "mqtts://h", "protocol": "4"}, "brokers.b.protocol: "),
    ({"url": "mqtts://h", "ca": "ca.pem", "cert": "ca.pem", "key": "ca.pem", "insecure": True}, None),
])
def test_tls_options_are_checked(tmp_path, broker, problem):
    from pipeline.config import load as config
    from pipeline.errors import ConfigError

    (tmp_path / "ca.pem").write_text("not checked until the stage connects\n")
    data = {"brokers": {"b": broker}, "models": {"m": {"path": str(Path(__file__).parent / "models/probe")}},
            "rules": [{"name": "r", "sub": {"broker": "b", "topic": "t"}, "model": "m",
                       "pub": {"broker": "b", "topic": "o"}}]}
    if problem is None:
        b = config.parse(data, tmp_path / "pipeline.yaml").brokers["b"]
        assert (b.ca, b.cert, b.key, b.insecure) == (tmp_path / "ca.pem",) * 3 + (True,)  # relative to the file
        return
    with pytest.raises(ConfigError) as e:
        config.parse(data, tmp_path / "pipeline.yaml")
    assert any(p.startswith(problem) for p in e.value.problems), e.value.problems


def test_unusable_tls_file_stops_the_stack(tls_broker, stack_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("TLS_TEST_PASSWORD", PASSWORD)
    text = config_for(tls_broker, tmp_path, f"mqtts://127.0.0.1:{tls_broker.port_in}", "tls/server.ext")
    up = stack_factory(text, ready=False)
    assert up.proc.wait(60) == 2, up.output()  # CONFIG_ERROR: a restart would not help
    assert "cannot use the TLS files (ca, cert, key)" in up.output() and "brokers.in" in up.output()
    secrets_nowhere(up, PASSWORD)
