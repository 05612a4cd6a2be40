"""The control API's gate (Host/Origin allow-list, body limit) on falcon's TestClient, and its configuration:
control.allowed_hosts, control.tls, and the warning `pipeline check` prints when control is exposed."""

from __future__ import annotations

from pathlib import Path

import falcon.testing
import pytest
from test_control import Fake, healthy, make_cfg
from test_tls import make_certs

from pipeline.commands import cli
from pipeline.config import load as config
from pipeline.config import snapshot as frozen
from pipeline.control.app import create_app
from pipeline.errors import ConfigError

TOKEN = "tok-0123456789abcdef-gate"


def client(tmp_path: Path, **control: object) -> falcon.testing.TestClient:
    cfg = make_cfg(tmp_path)
    cfg = cfg.model_copy(update={"control": config.Control(**control)}) if control else cfg
    return falcon.testing.TestClient(create_app(cfg, Fake(healthy())))


@pytest.mark.parametrize("host", ["127.0.0.1:5888", "10.1.2.3", "[::1]:5888", "[fe80::1]", "localhost:5888",
                                  "LOCALHOST.", "dash.example.org:443", "edge-7:5888"])
def test_addresses_localhost_listen_host_and_allowed_names_pass(tmp_path, host):
    c = client(tmp_path, listen="edge-7:5888", allowed_hosts=["Dash.Example.org"])
    assert c.simulate_get("/stages", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize("path", ["/stages", "/healthz", "/static/dashboard.js", "/"])
def test_a_foreign_host_is_421_on_every_path_naming_it_and_how_to_allow_it(tmp_path, path):
    r = client(tmp_path).simulate_get(path, headers={"Host": "rebind.attacker.example:5888"})
    assert r.status_code == 421
    assert r.json["title"] == "host not allowed"
    assert "'rebind.attacker.example:5888'" in r.json["description"]
    assert "control.allowed_hosts" in r.json["description"]


@pytest.mark.parametrize("host", ["127.0.0.1.attacker.example", "127.1", "localhost.attacker.example", "x:y:z"])
def test_names_that_merely_look_local_are_refused(tmp_path, host):
    assert client(tmp_path).simulate_get("/healthz", headers={"Host": host}).status_code == 421


def test_an_origin_must_be_ours_too(tmp_path):
    c = client(tmp_path, allowed_hosts=["dash.example.org"])
    ok = {"Host": "127.0.0.1:5888"}
    for origin in ("http://127.0.0.1:5888", "https://dash.example.org", "http://[::1]:5888"):
        assert c.simulate_get("/stages", headers={**ok, "Origin": origin}).status_code == 200, origin
    for origin in ("http://attacker.example", "null", "http://[bad"):
        r = c.simulate_get("/stages", headers={**ok, "Origin": origin})
        assert r.status_code == 403, origin
        assert r.json["title"] == "origin not allowed" and repr(origin) in r.json["description"]


def test_a_body_is_refused_over_the_limit_or_of_unknown_length(tmp_path):
    c = client(tmp_path, token=TOKEN)
    auth = {"Host": "localhost", "Authorization": f"Bearer {TOKEN}"}
    r = c.simulate_post("/models/probe/reload", headers=auth, body=b"x" * 2000)
    assert r.status_code == 413 and "2000 bytes" in r.json["description"] and "1024" in r.json["description"]
    r = c.simulate_post("/models/probe/reload", headers={**auth, "Transfer-Encoding": "chunked"})
    assert r.status_code == 413 and "unknown length" in r.json["description"]
    assert c.simulate_get("/healthz", headers={"Host": "localhost"}, body=b"x" * 10).status_code == 200


def test_with_protect_reads_the_page_and_its_files_are_open_and_the_data_is_not(tmp_path):
    c = client(tmp_path, token=TOKEN, protect_reads=True)
    local = {"Host": "localhost"}
    assert c.simulate_get("/", headers=local).status_code == 200
    assert c.simulate_get("/static/dashboard.js", headers=local).status_code == 200
    r = c.simulate_get("/stages", headers=local)
    assert r.status_code == 403 and r.json["title"] == "token required"
    assert c.simulate_get("/stages", headers={**local, "Authorization": f"Bearer {TOKEN}"}).status_code == 200


def write(tmp_path: Path, control: str) -> Path:
    p = tmp_path / "pipeline.yaml"
    p.write_text(f"""
brokers: {{local: {{url: "mqtt://127.0.0.1:1883"}}}}
models: {{probe: {{path: {Path(__file__).parent / "models" / "probe"}}}}}
rules:
  - {{name: r, sub: {{broker: local, topic: "a/+"}}, model: probe, pub: {{broker: local, topic: "b/{{1}}"}}}}
control: {control}
""")
    return p


@pytest.mark.parametrize(("entry", "why"), [("http://dash.example", "expected a DNS name"),
                                             ("dash.example:5888", "expected a DNS name"),
                                             ("*.example", "expected a DNS name"),
                                             ("10.0.0.1", "IP addresses are always allowed")])
def test_bad_allowed_hosts_name_the_file_key_and_value(tmp_path, entry, why):
    p = write(tmp_path, f'{{allowed_hosts: [ok.example, "{entry}"]}}')
    with pytest.raises(ConfigError) as e:
        config.load(p)
    assert str(p) in str(e.value) and "allowed_hosts" in str(e.value) and entry in str(e.value)
    assert why in str(e.value)


def test_tls_files_are_relative_to_the_config_checked_and_survive_freezing(tmp_path, monkeypatch):
    (tmp_path / "tls").mkdir()
    make_certs(tmp_path / "tls")
    cfg = config.load(write(tmp_path, "{tls: {cert: tls/server.pem, key: tls/server.key}}"))
    assert cfg.control.tls.cert == tmp_path / "tls" / "server.pem"
    (tmp_path / "run").mkdir()
    assert frozen.write(tmp_path / "run", cfg, "run-1") is not None
    monkeypatch.setenv(frozen.RUN, "run-1")
    back = frozen.read(tmp_path / "run", cfg.source)
    assert back.control.tls.key == tmp_path / "tls" / "server.key"
    assert type(back.control.tls).__name__ == "ControlTls"
    for control, what in (("{tls: {cert: tls/missing.pem, key: tls/server.key}}", "no such file"),
                          ("{tls: {cert: tls/server.pem, key: tls/client.key}}", "do not load as a pair"),
                          ("{tls: {cert: tls/server.pem}}", "key")):
        with pytest.raises(ConfigError) as e:
            config.load(write(tmp_path, control))
        assert "control.tls" in str(e.value) and what in str(e.value), str(e.value)


def test_check_warns_when_control_listens_beyond_loopback_without_tls_or_token(tmp_path):
    warned = cli.summary(config.load(write(tmp_path, '{listen: "0.0.0.0:5888"}')))
    assert "warning: control listens on 0.0.0.0:5888 without TLS" in warned and "control.tls" in warned
    assert "without a token" in warned
    quiet = cli.summary(config.load(write(tmp_path, '{listen: "localhost:5888"}')))
    assert "warning" not in quiet
