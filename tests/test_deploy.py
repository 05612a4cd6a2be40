"""Dockerfile, docker-compose.yml, deploy/k8s, deploy/supervisor and `pipeline supervisord-conf`, checked against
the code by parsing them (no Docker engine, no cluster): config path, ports, probe urls, data dir, stop timeouts."""

from __future__ import annotations

import configparser
import fnmatch
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import cli

from pipeline import errors
from pipeline.commands import supervisord_conf as deploy
from pipeline.config import load as config
from pipeline.supervision.runner import Stack

ROOT = Path(__file__).parent.parent
CONFIG_PATH = "/etc/pipeline/pipeline.yaml"
SENTINEL_ENV = ("PIPELINE_NAME", "PIPELINE_BROKER_URL", "PIPELINE_DATA_DIR", "MQTT_USER", "MQTT_PASSWORD",
                "PIPELINE_CONTROL_TOKEN")


def programs_of(text: str) -> dict[str, dict[str, str]]:
    """Program name -> its settings, from a supervisord.conf text (raw: supervisord's %(...)s stay as written)."""
    parser = configparser.RawConfigParser()
    parser.read_string(text)
    return {s.removeprefix("program:"): dict(parser[s]) for s in parser.sections() if s.startswith("program:")}


def dockerfile() -> list[list[tuple[str, str]]]:
    """The Dockerfile's stages, each a list of (INSTRUCTION, arguments); continuations joined, comments dropped."""
    lines = [ln for ln in (ROOT / "Dockerfile").read_text().splitlines() if not ln.lstrip().startswith("#")]
    stages: list[list[tuple[str, str]]] = []
    for line in re.sub(r"\\\n", " ", "\n".join(lines)).splitlines():
        instr, _, rest = line.strip().partition(" ")
        if instr.upper() == "FROM":
            stages.append([])
        if instr and stages:
            stages[-1].append((instr.upper(), rest.strip()))
    return stages


def args_of(stage: list[tuple[str, str]], instr: str) -> list[str]:
    return [rest for i, rest in stage if i == instr]


def in_container(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, text: str, env: dict[str, str]) -> config.Config:
    """Load a config as the container sees it: at CONFIG_PATH, next to the image's models, with `env`."""
    etc = tmp_path / CONFIG_PATH.strip("/")
    etc.parent.mkdir(parents=True, exist_ok=True)
    etc.write_text(text)
    if not (etc.parent / "models").exists():
        (etc.parent / "models").symlink_to(ROOT / "models")
    for var in SENTINEL_ENV:
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    return config.load(etc)


def control_port(cfg: config.Config) -> int:
    host, port = cfg.control.listen.rsplit(":", 1)
    assert host == "0.0.0.0", "in a container the control API must listen on every interface"
    return int(port)


def stop_timeout(cfg: config.Config, tmp_path: Path) -> float:
    return Stack(cfg, tmp_path / "run", "info").stop_timeout


def test_dockerfile(monkeypatch, tmp_path):
    stages = dockerfile()
    assert len(stages) >= 2, "multi-stage: wheels built in a builder stage"
    builder, final = stages[0], stages[-1]
    assert "AS builder" in args_of(builder, "FROM")[0] and any("pip wheel" in r for r in args_of(builder, "RUN"))
    runs = " ".join(args_of(final, "RUN"))
    assert not re.search(r"\b(gcc|g\+\+|clang|build-essential|make|cmake)\b", runs), "a compiler in the final stage"
    assert "from=builder" in runs and "--no-index" in runs, "the final stage installs the builder's wheels only"
    user = args_of(final, "USER")[-1].split(":")[0]
    assert user not in ("root", "0")
    entry = json.loads(args_of(final, "ENTRYPOINT")[-1])
    i = entry.index("pipeline")
    assert entry[i:i + 4] == ["pipeline", "up", "-c", CONFIG_PATH]
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(args_of(final, "ENV"))))
    cfg = in_container(monkeypatch, tmp_path, (ROOT / "deploy/pipeline.yaml").read_text(), env)
    port = control_port(cfg)
    assert f"http://127.0.0.1:{port}/readyz" in args_of(final, "HEALTHCHECK")[-1]
    assert str(port) in args_of(final, "EXPOSE")[-1].split()
    assert json.loads(args_of(final, "VOLUME")[-1]) == [str(cfg.default_data_dir())]
    assert re.search(rf"chown {user}:\d+ {cfg.default_data_dir()}", runs), "the data dir belongs to the user"
    copies = {dst: src for src, dst in (c.split() for c in args_of(final, "COPY") if "--from" not in c)}
    assert copies[CONFIG_PATH] == "deploy/pipeline.yaml" and copies["/etc/pipeline/models"] == "models"


def test_dockerignore_keeps_what_the_build_copies():
    ignored = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
               if p.strip() and not p.startswith(("#", "!"))]
    sources = [w for stage in dockerfile() for c in args_of(stage, "COPY") if "--from" not in c
               for w in c.split()[:-1]]
    assert "pipeline" in sources and ".git" in ignored and ".venv" in ignored
    for src in sources:
        assert (ROOT / src).exists(), src
        for pat in ignored:
            assert not fnmatch.fnmatch(src, pat) and not src.startswith(pat.rstrip("/") + "/"), (src, pat)


def test_compose(monkeypatch, tmp_path):
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mosq, pipe = doc["services"]["mosquitto"], doc["services"]["pipeline"]
    assert mosq["image"].startswith("eclipse-mosquitto:2") and pipe["build"] == "."
    assert "mosquitto" in pipe["depends_on"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in pipe["volumes"]}
    assert (ROOT / mounts[CONFIG_PATH]).is_file() and (ROOT / mounts["/etc/pipeline/models"]).is_dir()
    env = {k: re.sub(r"\$\{\w+:-(.*)\}", r"\1", str(v)) for k, v in pipe["environment"].items()}
    cfg = in_container(monkeypatch, tmp_path, (ROOT / mounts[CONFIG_PATH]).read_text(), env)
    data = str(cfg.default_data_dir())
    assert mounts[data] in doc["volumes"], "the data dir is a named volume"
    port = control_port(cfg)
    assert any(p.endswith(f":{port}") for p in pipe["ports"])
    broker = cfg.brokers["local"]
    assert broker.host == "mosquitto", "the pipeline reaches the compose service by its name"
    mconf = {m.split(":")[1]: m.split(":")[0] for m in mosq["volumes"]}
    conf = (ROOT / mconf["/mosquitto/config/mosquitto.conf"]).read_text()
    assert re.search(rf"^listener {broker.port}\b", conf, re.M)
    assert re.search(r"^persistence_location (\S+)", conf, re.M).group(1).rstrip("/") == "/mosquitto/data"
    assert "/mosquitto/data" in mconf
    grace = float(pipe["stop_grace_period"].rstrip("s"))
    assert grace >= stop_timeout(cfg, tmp_path), "docker would SIGKILL the stack while ingress drains"


def manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted((ROOT / "deploy/k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def container_env(pod: dict[str, Any], container: dict[str, Any], docs: list[dict[str, Any]]) -> dict[str, str]:
    env = {"PIPELINE_NAME": "edge-node-1"} if any("valueFrom" in e for e in container.get("env", [])) else {}
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    for ref in container.get("envFrom", []):
        secret = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == ref["secretRef"]["name"])
        env.update(secret["stringData"])
    return env


def test_k8s_manifests(monkeypatch, tmp_path):
    docs = manifests()
    assert {d["kind"] for d in docs} >= {"Namespace", "ConfigMap", "Secret", "DaemonSet"}
    namespace = next(d for d in docs if d["kind"] == "Namespace")["metadata"]["name"]
    assert all(d["metadata"].get("namespace", namespace) == namespace for d in docs)
    workloads = [d for d in docs if d["kind"] in ("Deployment", "DaemonSet")]
    for w in workloads:
        check_pod(w["spec"]["template"]["spec"], docs, monkeypatch, tmp_path)
    secret = next(d for d in docs if d["kind"] == "Secret")
    assert set(secret["stringData"]) == {"MQTT_USER", "MQTT_PASSWORD", "PIPELINE_CONTROL_TOKEN"}
    assert all(v == "" for v in secret["stringData"].values()), "no real secret in the repository"


def check_pod(pod: dict[str, Any], docs: list[dict[str, Any]], monkeypatch, tmp_path: Path) -> None:
    assert "node-role.kubernetes.io/edge" in pod["nodeSelector"]
    assert any(t["key"] == "node-role.kubernetes.io/edge" for t in pod["tolerations"])
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    (c,) = [c for c in pod["containers"] if c["name"] == "pipeline"]
    assert "command" not in c and "args" not in c, "the image's ENTRYPOINT (pipeline up -c CONFIG_PATH) runs"
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    cm_name = volumes[mounts[CONFIG_PATH]["name"]]["configMap"]["name"]
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == cm_name)
    text = cm["data"][mounts[CONFIG_PATH]["subPath"]]
    cfg = in_container(monkeypatch, tmp_path, text, container_env(pod, c, docs))
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = c[probe]["httpGet"]
        assert get["path"] == path and ports.get(get["port"], get["port"]) == control_port(cfg)
    data = mounts[str(cfg.default_data_dir())]
    assert "configMap" not in volumes[data["name"]] and not data.get("readOnly")
    assert c["resources"]["requests"] and c["resources"]["limits"]
    assert pod["terminationGracePeriodSeconds"] >= stop_timeout(cfg, tmp_path)
    for var in ("MQTT_USER", "MQTT_PASSWORD", "PIPELINE_CONTROL_TOKEN"):
        assert "${" + var in text, f"the Secret's {var} feeds the config"


def test_shipped_configs_validate(monkeypatch, tmp_path):
    cfg = in_container(monkeypatch, tmp_path, (ROOT / "deploy/pipeline.yaml").read_text(), {})
    assert cfg.instance == "pipeline" and cfg.brokers["local"].url == "mqtt://mosquitto:1883"
    named = in_container(monkeypatch, tmp_path, (ROOT / "deploy/pipeline.yaml").read_text(), {"PIPELINE_NAME": "b2"})
    assert named.instance == "b2", "PIPELINE_NAME names the instance (its MQTT client ids)"


PROBE_CONFIG = """
brokers: {local: {url: BROKER}}
models: {probe: {path: MODELS/probe}}
rules:
  - {name: one, sub: {broker: local, topic: "in/one/+"}, model: probe, pub: {broker: local, topic: "out/one"}}
  - {name: two, sub: {broker: local, topic: "in/two/+"}, model: probe, pub: {broker: local, topic: "out/two"}}
control: {listen: CONTROL}
"""


def test_supervisord_conf_is_what_pipeline_up_runs(broker, stack_factory):
    up = stack_factory(PROBE_CONFIG.replace("BROKER", broker.url), "--workers", "two=3")
    out = cli("supervisord-conf", "-c", str(up.config), "--run-dir", str(up.run_dir), "--workers", "two=3")
    assert out.returncode == 0, out.stderr
    running = (up.run_dir / "supervisord.conf").read_text()
    ours, theirs = configparser.RawConfigParser(), configparser.RawConfigParser()
    ours.read_string(out.stdout)
    theirs.read_string(running)
    assert ours.sections() == theirs.sections()
    printed, ran = programs_of(out.stdout), programs_of(running)
    for name, program in ran.items():  # `pipeline up` starts workers without the stack's secrets
        words = shlex.split(program["command"])
        if name == "forkserver":
            assert words[0].endswith("/env") and words[1:3] == ["-u", "PIPELINE_SECRETS"], program["command"]
            program["command"] = shlex.join(words[words.index(sys.executable):])
    assert printed == ran
    assert "--workers two=3" in printed["forkserver"]["command"]


def test_supervisord_conf_programs_only(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text(PROBE_CONFIG.replace("BROKER", "mqtt://127.0.0.1:1883").replace("CONTROL", "127.0.0.1:5999")
                    .replace("MODELS", str(ROOT / "tests/models")))
    out = cli("supervisord-conf", "-c", str(path), "--programs-only", "--user", "pipeline", "--log-dir", "/var/log/p")
    assert out.returncode == 0, out.stderr
    parser = configparser.RawConfigParser()
    parser.read_string(out.stdout)
    programs = programs_of(out.stdout)
    assert parser.sections() == [f"program:{p}" for p in programs] + ["group:pipeline"]
    assert parser["group:pipeline"]["programs"].split(",") == list(programs)
    assert all(p["user"] == "pipeline" and p["stdout_logfile"].startswith("/var/log/p/") for p in programs.values())
    fatal = {str(c) for c in errors.FATAL_EXIT_CODES}
    assert all(fatal <= set(p["exitcodes"].split(",")) for p in programs.values())
    bad = cli("supervisord-conf", "-c", str(path), "--workers", "nope=2")
    assert bad.returncode == errors.CONFIG_ERROR and "no rule named 'nope'" in bad.stderr


def test_supervisor_example_is_current(monkeypatch, tmp_path):
    """deploy/supervisor/pipeline.conf = `pipeline supervisord-conf --programs-only` on deploy/pipeline.yaml
    installed as in docs/operations.md (venv /opt/pipeline, config /etc/pipeline/pipeline.yaml)."""
    cfg = in_container(monkeypatch, tmp_path, (ROOT / "deploy/pipeline.yaml").read_text(), {})
    text = deploy.conf_text(cfg, Path("/run/pipeline"), "info", Path("/var/log/pipeline"), True, "pipeline")
    text = text.replace(sys.executable, "/opt/pipeline/bin/python").replace(str(tmp_path), "")
    example = ROOT / "deploy/supervisor/pipeline.conf"
    shipped = "\n".join(ln for ln in example.read_text().splitlines() if not ln.startswith("#")).strip()
    if shipped != text.strip():
        fresh = ROOT / "tests/artifacts/supervisor-pipeline.conf"
        fresh.parent.mkdir(exist_ok=True)
        fresh.write_text(text)
        pytest.fail(f"{example} is stale: the current programs are in {fresh} (keep the # header)")


def test_systemd_unit(monkeypatch, tmp_path):
    unit = configparser.RawConfigParser(strict=True)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string((ROOT / "deploy/supervisor/pipeline.service").read_text())
    svc = unit["Service"]
    assert f"pipeline up -c {CONFIG_PATH}" in svc["ExecStart"] and svc["User"] not in ("root", "0")
    assert svc["KillMode"] == "mixed", "SIGTERM to pipeline up alone: it stops the stages in order"
    assert set(svc["RestartPreventExitStatus"].split()) == {str(c) for c in errors.FATAL_EXIT_CODES}
    data = svc["Environment"].split("=", 1)
    assert data[0] == "PIPELINE_DATA_DIR" and data[1] == f"/var/lib/{svc['StateDirectory']}"
    assert f"--run-dir /run/{svc['RuntimeDirectory']}" in svc["ExecStart"]
    cfg = in_container(monkeypatch, tmp_path, (ROOT / "deploy/pipeline.yaml").read_text(), {})
    assert float(svc["TimeoutStopSec"]) >= stop_timeout(cfg, tmp_path)
