"""The fork server on the real stack (real Mosquitto, real supervisord): every local worker is forked from one process,
a worker killed with SIGKILL is forked again alone and serves, and the control channel survives hostile input."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import orjson
from conftest import Up, processes, wait_until

from pipeline.supervision import run_dir as rundir
from pipeline.supervision.forkctl import ForkServer

RULES = 20
RULE = """
  - name: r{i}
    sub: {{broker: local, topic: "fs/r{i}/in", qos: 1}}
    model: probe
    pub: {{broker: local, topic: "fs/r{i}/out", qos: 1}}
    workers: 1
"""


def config(broker, rules: int) -> str:
    return (f"brokers:\n  local: {{url: {broker.url}}}\nmodels:\n  probe: {{path: MODELS/probe}}\nrules:"
            + "".join(RULE.format(i=i) for i in range(rules)) + "control: {listen: CONTROL}\n")


def forkserver_pid(up: Up) -> int:
    cmds = processes()
    return next(pid for pid in up.pids() if "pipeline forkserver" in cmds.get(pid, ""))


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def test_a_killed_worker_of_20_rules_is_forked_again_alone_and_serves(broker, probe_factory, stack_factory):
    up = stack_factory(config(broker, RULES))
    assert wait_until(lambda: len(up.worker_pids()) == RULES, 30), up.worker_pids()
    before = up.worker_pids()
    server = forkserver_pid(up)
    assert all(parent_of(pid) == server for pids in before.values() for pid in pids)
    victim = next(iter(before["r7"]))
    os.kill(victim, signal.SIGKILL)
    replaced = wait_until(lambda: (p := up.worker_pids()).get("r7") and victim not in p["r7"] and p, 20)
    assert replaced, f"r7's worker was not replaced: {up.worker_pids()}\n{up.output()[-3000:]}"
    (new,) = replaced["r7"]
    assert parent_of(new) == server
    assert {r: p for r, p in replaced.items() if r != "r7"} == {r: p for r, p in before.items() if r != "r7"}
    assert f"rule-r7-0 (rule r7, pid {victim}) ended" in up.output() and "killed by SIGKILL" in up.output()
    probe = probe_factory("fs/+/out")
    probe.publish("fs/r7/in", {"seq": 1})
    probe.publish("fs/r3/in", {"seq": 2})
    got = {topic: orjson.loads(payload) for topic, payload in probe.wait_for(2, timeout=20)}
    assert got["fs/r7/out"]["pid"] == new and got["fs/r7/out"]["rule"] == "r7"
    assert got["fs/r3/out"]["pid"] in before["r3"]


def ask(sock: socket.socket, line: bytes) -> dict:
    sock.sendall(line)
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        assert chunk, f"the fork server closed the connection after {line[:60]!r}"
        data += chunk
    return json.loads(data)


def test_the_control_channel_survives_hostile_input(broker, stack_factory):
    up = stack_factory(config(broker, 1))
    path = up.run_dir / rundir.FORKSERVER_SOCKET
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    before = ForkServer(up.run_dir).call("list")["workers"]
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(path))
        for line in (b"not json\n", b"\xff\xfe\x00\n", b"[1, 2]\n", b'{"op": 7}\n', b'{"op": "shutdown"}\n',
                     b'{"op": "replace", "rule": "r0", "index": true}\n', b'{"op": "replace", "rule": "r0"}\n',
                     b'{"op": "replace", "rule": "r0", "index": 5}\n', b'{"op": "start_spare", "rule": ["r0"]}\n',
                     b'{"op": "stop_spare", "rule": "nope"}\n', b"[" * 3000 + b"\n",
                     b'{"op": "list", "rule": 1e999}\n'):
            answer = ask(s, line)
            assert answer["ok"] is False and answer["error"], (line[:60], answer)
        assert ask(s, b'{"op": "list"}\n')["ok"] is True
    with socket.socket(socket.AF_UNIX) as s:  # a line over the limit: an error, then the connection is closed
        s.connect(str(path))
        assert "at most" in ask(s, b"x" * 10_000)["error"]
    idle = [socket.socket(socket.AF_UNIX) for _ in range(40)]  # more connections than it keeps, all silent
    for s in idle:
        s.connect(str(path))
    try:
        assert ForkServer(up.run_dir).call("list")["workers"] == before
    finally:
        for s in idle:
            s.close()
    assert up.proc.poll() is None


def test_workers_die_with_their_fork_server_and_come_back_with_the_next(broker, probe_factory, stack_factory):
    up = stack_factory(config(broker, 1), "--workers", "r0=2")
    assert wait_until(lambda: len(up.worker_pids().get("r0", ())) == 2, 20), up.worker_pids()
    old_server, old = forkserver_pid(up), up.worker_pids()["r0"]
    os.kill(old_server, signal.SIGKILL)
    assert wait_until(lambda: not old & set(processes()), 10), "a worker outlived its fork server"
    assert wait_until(lambda: len(up.worker_pids().get("r0", set()) - old) == 2, 30), up.worker_pids()
    assert forkserver_pid(up) != old_server
    probe = probe_factory("fs/+/out")
    probe.publish("fs/r0/in", {"seq": 1})
    (got,) = probe.wait_for(1, timeout=20)
    assert orjson.loads(got[1])["pid"] in up.worker_pids()["r0"]


def test_a_slot_whose_workers_keep_dying_at_once_is_backed_off_but_not_one_whose_worker_timed_out(tmp_path):
    import argparse

    from pipeline.config import load
    from pipeline.stages.forkserver.arbiter import ForkServer as Arbiter

    path = tmp_path / "p.yaml"
    path.write_text(config(type("B", (), {"url": "mqtt://127.0.0.1:1"}), 1).replace("CONTROL", "127.0.0.1:1")
                    .replace("MODELS", str(Path(__file__).parent / "models")))
    (tmp_path / "run").mkdir(mode=0o700)
    server = Arbiter(argparse.Namespace(), load.load(path), tmp_path / "run")
    try:
        slot, delays = server.slots["r0", 0], []
        for status in (1 << 8, 1 << 8, 1 << 8, signal.SIGSEGV, 5 << 8, 6 << 8, 1 << 8):  # exit 1, SIGSEGV, 5, 6
            slot.pid, slot.forked_at, server.by_pid[4242] = 4242, time.monotonic(), slot
            server._ended(4242, status)
            delays.append(round(slot.due - time.monotonic(), 1))
        assert delays == [0.0, 0.1, 0.2, 0.4, 0.0, 0.0, 0.0]
        assert [(e["code"], e["signal"]) for e in server.exits] == [(1, None)] * 3 + [(None, 11), (5, None),
                                                                                      (6, None), (1, None)]
    finally:
        server.channel.close()
