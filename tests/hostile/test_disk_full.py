"""The outbox on a disk that fills up (a tmpfs of the test's own, filled by a file): egress stays up, stores
and confirms nothing while writes fail, `/readyz` says why, QoS 1 input waits unacknowledged at the broker,
and once space returns every message comes out. Needs root to mount the tmpfs (CI runs as root)."""

from __future__ import annotations

import os
import subprocess
import time

import orjson
import pytest
from test_frames import CONFIG as FRAMES_CONFIG
from test_mqtt_input import stage_pid

CONFIG = FRAMES_CONFIG.replace("control:", "data_dir: DATA\ncontrol:")  # the outbox on the small disk


@pytest.fixture
def small_disk(tmp_path):
    where = tmp_path / "small"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(where)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def fill(where) -> None:
    """Take every free byte of the file system at `where`."""
    with open(where / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError:
            pass
        os.fsync(f.fileno())


def test_a_full_disk_holds_the_flow_and_loses_nothing(broker, probe_factory, stack_factory, small_disk):
    up = stack_factory(CONFIG.replace("LOCAL", broker.url).replace("DATA", str(small_disk)))
    egress = stage_pid(up, "egress")
    probe = probe_factory("out/#")
    fill(small_disk)
    for seq in range(200):
        probe.publish(f"in/d{seq}", {"seq": seq, "pad": 2000})
    deadline = time.monotonic() + 30
    status, body = up.get("/readyz")
    while time.monotonic() < deadline and "egress: outbox: disk full" not in str(body):
        time.sleep(0.2)
        status, body = up.get("/readyz")
    assert status == 503 and "egress: outbox: disk full" in str(body), body
    time.sleep(3.0)
    held = len(probe.received())
    assert held < 200 and stage_pid(up, "egress") == egress  # waiting, not crashing
    (small_disk / "filler").unlink()
    got = probe.wait_for(200, timeout=60)
    assert sorted({orjson.loads(p)["seq"] for _, p in got}) == list(range(200))
    assert stage_pid(up, "egress") == egress
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and up.get("/readyz")[0] != 200:
        time.sleep(0.2)
    assert up.get("/readyz")[0] == 200
    doc = next(s for s in up.get("/stages")[1]["stages"] if s["name"] == "egress")
    while time.monotonic() < deadline and doc["depth"]:  # the deletes of the last rows show in a later snapshot
        time.sleep(0.5)
        doc = next(s for s in up.get("/stages")[1]["stages"] if s["name"] == "egress")
    assert doc["counters"].get("disk_full", 0) >= 1 and doc["depth"] == 0
