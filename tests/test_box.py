"""The stack on a shared box: a run directory another user cannot take, files only its user reads, and secrets
only in the processes that use them (pipeline.supervision.run_dir, pipeline.config.snapshot, `pipeline up`)."""

from __future__ import annotations

import json
import os
import pwd
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from conftest import processes

from pipeline.config import snapshot as frozen
from pipeline.errors import StartupError
from pipeline.supervision import run_dir as rundir

PASSWORD = "pw-box-Zq8-never-in-a-worker"
TOKEN = "tk-box-3f9c0a7d51e24b6b-never-in-a-worker"
NOBODY = pwd.getpwnam("nobody").pw_uid

CONFIG = """
brokers: {local: {url: BROKER, username: edge, password: "${BOX_MQTT_PASSWORD}"}}
models: {probe: {path: MODELS/probe}}
rules:
  - {name: one, sub: {broker: local, topic: "in/box/+"}, model: probe, pub: {broker: local, topic: "out/box"}}
control: {listen: CONTROL, token: "${BOX_TOKEN}"}
"""

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root (CI runs as root)")


def up(config: Path, run_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", "up", "-c", str(config), "--run-dir", str(run_dir)],
                          capture_output=True, text=True, timeout=60)


def probe_config(tmp_path: Path) -> Path:
    path = tmp_path / "p.yaml"
    models = Path(__file__).parent / "models"
    path.write_text(CONFIG.replace("BROKER", "mqtt://127.0.0.1:1").replace("CONTROL", "127.0.0.1:1")
                    .replace("MODELS", str(models)).replace('"${BOX_MQTT_PASSWORD}"', "x")
                    .replace('"${BOX_TOKEN}"', "null"))
    return path


@root_only
def test_a_run_directory_another_user_made_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    os.chown(run, NOBODY, NOBODY)
    out = up(probe_config(tmp_path), run)
    assert out.returncode == 4, out.stderr
    assert f"run directory {run}: refused: it belongs to user nobody (uid {NOBODY})" in out.stderr
    assert os.listdir(run) == []  # no supervisord.conf, no config.json, no socket
    stage = subprocess.run([sys.executable, "-m", "pipeline", "ingress", "-c", str(probe_config(tmp_path)),
                            "--run-dir", str(run)], capture_output=True, text=True, timeout=60)
    assert stage.returncode == 4 and "belongs to user nobody" in stage.stderr
    assert os.listdir(run) == []  # not even the fatal reason


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o770])
def test_a_run_directory_others_may_write_in_is_refused(tmp_path, mode):
    run = tmp_path / "run"
    run.mkdir()
    os.chmod(run, mode)
    out = up(probe_config(tmp_path), run)
    assert out.returncode == 4, out.stderr
    assert f"group or others may write in it (mode {mode:04o})" in out.stderr
    assert os.listdir(run) == []


def test_a_link_or_a_file_as_run_directory_is_refused(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(StartupError, match="refused: it is a symbolic link"):
        rundir.prepare(tmp_path / "link")
    (tmp_path / "file").write_text("")
    with pytest.raises(StartupError, match="refused: it is not a directory"):
        rundir.prepare(tmp_path / "file")


def test_ours_is_made_private(tmp_path):
    run = tmp_path / "run"
    run.mkdir(mode=0o755)
    os.chmod(run, 0o755)
    assert rundir.prepare(run) == run
    assert stat.S_IMODE(os.stat(run).st_mode) == 0o700
    fresh = rundir.prepare(tmp_path / "a" / "b")
    assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o700


def test_the_default_is_private_to_the_user(tmp_path, monkeypatch):
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert rundir.default("s1") == runtime / "pipeline-s1"
    os.chmod(runtime, 0o755)  # not private: not used
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert rundir.default("s1") == tmp_path / f"pipeline-{os.geteuid()}" / "s1"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    made = rundir.prepare(rundir.default("s1"))
    assert stat.S_IMODE(os.stat(made.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(made).st_mode) == 0o700


@root_only
def test_a_per_user_parent_another_user_made_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    parent = tmp_path / f"pipeline-{os.geteuid()}"
    parent.mkdir(mode=0o700)
    os.chown(parent, NOBODY, NOBODY)
    with pytest.raises(StartupError, match=f"run directory {parent}: refused: it belongs to user nobody"):
        rundir.prepare(rundir.default("s1"))
    assert os.listdir(parent) == []


def test_a_link_planted_where_a_file_is_written_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    (tmp_path / "supervisord.conf").symlink_to(victim)
    rundir.write_private(tmp_path / "supervisord.conf", "[supervisord]\n")
    assert victim.read_text() == "keep me"
    assert not (tmp_path / "supervisord.conf").is_symlink()
    assert stat.S_IMODE(os.stat(tmp_path / "supervisord.conf").st_mode) == 0o600
    (tmp_path / "reload.lock").symlink_to(victim)
    with pytest.raises(OSError):  # ELOOP: a lock is never taken through a link
        rundir.open_lock(tmp_path / "reload.lock")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reload.lock", "supervisord.conf", "victim"]


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(x.decode(errors="replace").partition("=")[::2] for x in raw.split(b"\0") if x)


def test_workers_hold_no_secret_and_files_are_private(broker, stack_factory, monkeypatch, tmp_path):
    monkeypatch.setenv("BOX_MQTT_PASSWORD", PASSWORD)
    monkeypatch.setenv("BOX_TOKEN", TOKEN)
    old = os.umask(0o022)  # what `pipeline up` is often started with
    try:
        stack = stack_factory(CONFIG.replace("BROKER", broker.url))
    finally:
        os.umask(old)
    cmds = processes()
    workers = [pid for pid in stack.pids() if " worker " in cmds[pid]]
    ingress = [pid for pid in stack.pids() if " ingress " in cmds[pid]]
    assert workers and ingress
    for pid in workers:
        env = _environ(pid)
        text = "\n".join(f"{k}={v}" for k, v in env.items())
        assert PASSWORD not in text and TOKEN not in text
        assert frozen.SECRETS not in env and "BOX_MQTT_PASSWORD" not in env and "BOX_TOKEN" not in env
        assert env[frozen.RUN]  # it still reads the config `pipeline up` validated
    given = _environ(ingress[0])
    assert json.loads(given[frozen.SECRETS]) == [PASSWORD, TOKEN]  # the stage that logs in has them
    config_json = (stack.run_dir / frozen.FILE).read_text()
    assert PASSWORD not in config_json and TOKEN not in config_json
    _flows(broker)
    data = stack.run_dir.parent / "data"
    outbox = next(data.rglob("outbox.sqlite3"))
    private = [stack.run_dir, *stack.run_dir.rglob("*"), data, *data.rglob("*")]
    loose = {str(p): oct(stat.S_IMODE(os.lstat(p).st_mode)) for p in private
             if not p.is_socket() and stat.S_IMODE(os.lstat(p).st_mode) & 0o077}
    assert loose == {}
    assert stat.S_IMODE(os.stat(outbox).st_mode) == 0o600


def _flows(broker) -> None:
    """A message in, its result out: the workers serve without the secrets."""
    got: list[bytes] = []
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    sub.on_message = lambda _c, _u, m: got.append(m.payload)
    sub.connect("127.0.0.1", broker.port)
    sub.subscribe("out/box", qos=1)
    sub.loop_start()
    try:
        import time

        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        pub.connect("127.0.0.1", broker.port)
        deadline = time.monotonic() + 20
        while not got and time.monotonic() < deadline:
            pub.publish("in/box/d1", b'{"value": 1}', qos=1).wait_for_publish(5)
            time.sleep(0.5)
        pub.disconnect()
    finally:
        sub.loop_stop()
        sub.disconnect()
    assert got
