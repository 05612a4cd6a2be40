"""Fixtures: a real Mosquitto on a free port, an MQTT probe client, and `pipeline up` as a subprocess."""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import orjson
import paho.mqtt.client as mqtt
import pytest

HERE = Path(__file__).parent
ROOT = HERE.parent


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--repeat", type=int, default=3, help="runs of each combined-fault test (tests/faults)")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`pipeline ARGS...` as a subprocess, its output captured as text."""
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=60)


def wait_until(check, timeout: float, step: float = 0.2):
    """check()'s first true answer within `timeout` seconds, looking every `step`; its last answer otherwise."""
    deadline = time.monotonic() + timeout
    while not (got := check()) and time.monotonic() < deadline:
        time.sleep(step)
    return got


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def processes() -> dict[int, str]:
    """pid -> command line (arguments joined by spaces) of every live, non-zombie process."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if ") Z" in (d / "stat").read_text():
                continue
            out[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            pass
    return out


class Mosquitto:
    """A mosquitto process of the test's own, which the test can stop and start again."""

    def __init__(self, workdir: Path, persistence: bool = False, extra: tuple[str, ...] = ()) -> None:
        if not shutil.which("mosquitto"):
            pytest.fail("mosquitto is not installed (bash scripts/test.sh installs it with apt-get)")
        self.port = free_port()
        self.workdir = workdir
        self.conf = workdir / "mosquitto.conf"
        # user: mosquitto started as root drops to user "mosquitto", which cannot write the persistence file here
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true", "max_queued_messages 100000",
                 f"user {getpass.getuser()}",
                 f"persistence {'true' if persistence else 'false'}", f"persistence_location {workdir}/",
                 "autosave_interval 1",
                 *[f"log_type {t}" for t in os.environ.get("PIPELINE_TEST_BROKER_LOG", "error,warning").split(",")],
                 "log_timestamp_format %H:%M:%S", *extra]
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = (self.workdir / "mosquitto.log").open("ab")
        self.proc = subprocess.Popen(["mosquitto", "-c", str(self.conf)], stdout=log, stderr=log)
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    m = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    m.start()
    yield m
    m.stop()


@pytest.fixture
def pbroker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A test's own Mosquitto with persistence: sessions and queued messages survive its restart (tests/faults)."""
    (tmp_path / "mosquitto").mkdir()
    m = Mosquitto(tmp_path / "mosquitto", persistence=True)
    m.start()
    yield m
    m.stop()


class Probe:
    """A test-side MQTT client: collects what arrives on its subscriptions, publishes test input."""

    def __init__(self, port: int, *subscriptions: str) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        subscribed = threading.Event()
        self.client.on_message = lambda _c, _u, m: self._got(m.topic, m.payload)
        self.client.on_subscribe = lambda *_a: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if subscriptions:
            self.client.subscribe([(s, 1) for s in subscriptions])
            assert subscribed.wait(5), "probe subscription not acknowledged"

    def _got(self, topic: str, payload: bytes) -> None:
        with self.lock:
            self.messages.append((topic, payload))

    def publish(self, topic: str, payload: bytes | str | dict, qos: int = 1) -> mqtt.MQTTMessageInfo:
        if isinstance(payload, dict):
            payload = orjson.dumps(payload)
        return self.client.publish(topic, payload, qos)

    def wait_for(self, n: int, timeout: float = 10.0, topic_prefix: str = "") -> list[tuple[str, bytes]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.received(topic_prefix)
            if len(got) >= n:
                return got
            time.sleep(0.02)
        return self.received(topic_prefix)

    def received(self, topic_prefix: str = "") -> list[tuple[str, bytes]]:
        with self.lock:
            return [m for m in self.messages if m[0].startswith(topic_prefix)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def probe_factory(broker: Mosquitto) -> Iterator:
    probes: list[Probe] = []

    def make(*subs: str) -> Probe:
        p = Probe(broker.port, *subs)
        probes.append(p)
        return p

    yield make
    for p in probes:
        p.close()


class Up:
    """`pipeline up` as a subprocess, the way an operator runs it."""

    def __init__(self, config: Path, run_dir: Path, control: str, *extra: str) -> None:
        self.config, self.run_dir, self.control = config, run_dir, control
        self.log = run_dir.parent / "up.log"
        args = [sys.executable, "-m", "pipeline", "up", "-c", str(config), "--run-dir", str(run_dir), *extra]
        self.proc = subprocess.Popen(args, stdout=self.log.open("wb"), stderr=subprocess.STDOUT,
                                     env={**os.environ, "PIPELINE_LOG_LEVEL": "INFO",
                                          "PIPELINE_DATA_DIR": str(run_dir.parent / "data")})

    def get(self, path: str) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(f"http://{self.control}{path}", timeout=2) as r:
                return r.status, orjson.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, orjson.loads(e.read())

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"pipeline up exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if self.get("/readyz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"stack not ready after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def pids(self) -> list[int]:
        """Pids of every process whose command line names this stack's run directory."""
        return [pid for pid, cmd in processes().items() if str(self.run_dir) in cmd and pid != self.proc.pid]

    def worker_pids(self) -> dict[str, set[int]]:
        """rule -> pids of the live processes serving it (its workers, or its pool's), as GET /models shows them."""
        out: dict[str, set[int]] = {}
        for model in self.get("/models")[1]["models"]:
            for w in model["workers"]:
                if w["alive"]:
                    out.setdefault(w["rule"], set()).add(w["pid"])
        return out

    def kill(self) -> None:
        """SIGKILL `pipeline up` and every process of its stack, at once (supervisord takes a second per group
        of programs to stop them one group after the other)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for _ in range(3):  # a fork server may fork a worker between two looks
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(os.getpgid(self.proc.pid), signal.SIGKILL)
            raise


@pytest.fixture
def stack_factory(tmp_path: Path) -> Iterator:
    """make(config_text, *up_args) writes the config into tmp_path and starts `pipeline up` on it."""
    stacks: list[Up] = []

    def make(config_text: str, *extra: str, ready: bool = True) -> Up:
        control = f"127.0.0.1:{free_port()}"
        text = config_text.replace("CONTROL", control).replace("MODELS", str(HERE / "models"))
        path = tmp_path / "pipeline.yaml"
        path.write_text(text)
        up = Up(path, tmp_path / "run", control, *extra)
        stacks.append(up)
        if ready:
            up.wait_ready()
        return up

    yield make
    for up in stacks:  # a stack's clean stop is a test of its own (test_e2e, test_example): here only speed counts
        up.kill()
