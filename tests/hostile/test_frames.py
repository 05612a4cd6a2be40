"""ZeroMQ peers sending malformed and forged frames to every socket the stages bind (the rule's ROUTER, beats
and confirms of ingress, results of egress, stats of control), on a running stack: each stage stays up and
counts them, a forged confirm releases no PUBACK, and every genuine message of the run comes out."""

from __future__ import annotations

import threading
import time

import msgpack
import orjson
import zmq
from fakebroker import FakeBroker, Wait, publish
from test_mqtt_input import stage_pid

from pipeline.config import load as config
from pipeline.wire import frames as envelope
from pipeline.wire.endpoints import Endpoints

CONFIG = """
brokers:
  local: {url: LOCAL}
models:
  probe: {path: MODELS/probe}
rules:
  - name: r
    sub: {broker: local, topic: "in/+", qos: 1}
    model: probe
    pub: {broker: local, topic: "out/{1}", qos: 1}
control: {listen: CONTROL}
"""
pack = envelope.pack
CREDIT, BEAT, TIMEOUT = envelope.CREDIT, envelope.BEAT, envelope.TIMEOUT
V = envelope.VERSION


def result(**fields: object) -> list:
    good = dict(message_id="x-1", rule="r", kind=envelope.PUBLISH, topic="out/x", payload=b"{}",
                source_broker="local", source_mid=1, source_qos=1, received_at=1.0, latency=0.0)
    return list({**good, **fields}.values())


BAD = {  # socket -> frames (a list: one multipart message), each refused
    "rule": [[pack([CREDIT, -5])], [pack([CREDIT, 10**9])], [pack([CREDIT, "x"])], [b"\xc1"], [b"a", b"b"],
             [pack([BEAT, 1])]],
    "beats": [[b"\xc1"], [pack([1, 2])], [pack(["w", 99, BEAT, 1])], [pack(["w", -1, BEAT, 1])],
              [pack(["w", 0, 7, 1])], [pack(["w", 0, TIMEOUT, "x"])], [pack([b"\xff", 0, BEAT, 1])],
              [pack(["w", 0, BEAT, 10**6])]],
    "confirms": [[b"\xc1"], [pack(0)], [pack(None)], [pack([["a", "b"]])], [pack([["id", "nosuch", "local", ""]])],
                 [pack([["id", "r", "nosuch", ""]])]],
    "results": [[b"\xc1"], [msgpack.packb([V + 1, [], ""])], [msgpack.packb([V, [[1, 2, 3]], ""])],
                [msgpack.packb([V, [result()], 7])], [bytes([0x93, V, 0x91, 0x9a, 0xa2, 0xff, 0xfe]) + b"\x00" * 9]],
    "bad_results": [[envelope.encode([envelope.Result(*result(payload="text"))], "w")],
                    [envelope.encode([envelope.Result(*result(rule="nosuch"))], "w")],
                    [envelope.encode([envelope.Result(*result(kind=7))], "w")],
                    [envelope.encode([envelope.Result(*result(source_mid=-1))], "w")],
                    [envelope.encode([envelope.Result(*result(message_id="é" * 100))], "w")],
                    [envelope.encode([envelope.Result(*result(), key="k", state=b"\x80")], "w")]],  # r has no key:
    "stats": [[b"\xc1"], [msgpack.packb({"stage": 1})]],
}


def send_all(up, kinds: dict[str, list[list[bytes]]]) -> None:
    cfg = config.load(up.config)
    eps = Endpoints.for_config(cfg, up.run_dir)
    ctx = zmq.Context()
    try:
        for name, frames in kinds.items():
            if name == "rule":
                sock = ctx.socket(zmq.DEALER)  # no identity: ZeroMQ gives it a binary one
                sock.connect(eps.address("rule", 0))
                sock.send(pack([CREDIT, 1]))
            else:
                kind = zmq.PUB if name == "stats" else zmq.PUSH
                sock = ctx.socket(kind)
                sock.connect(eps.address("results" if name == "bad_results" else name))
                time.sleep(0.2)  # PUB drops what it sends before the connection is up
            for parts in frames:
                sock.send_multipart(parts)
            time.sleep(0.3)
            sock.close(linger=1000)
    finally:
        ctx.term()


def test_malformed_and_forged_frames_to_every_bound_socket(broker, probe_factory, stack_factory):
    up = stack_factory(CONFIG.replace("LOCAL", broker.url))
    pids = {stage: stage_pid(up, stage) for stage in ("ingress", "egress", "control")}
    probe = probe_factory("out/#", "pipeline/errors/#")
    send_all(up, BAD)
    for seq in range(50):
        probe.publish(f"in/d{seq}", {"seq": seq})
    got = probe.wait_for(50, timeout=30, topic_prefix="out/")
    assert sorted(orjson.loads(p)["seq"] for _, p in got) == list(range(50))
    assert {stage: stage_pid(up, stage) for stage in pids} == pids  # none restarted
    time.sleep(1.0)  # the next snapshots
    stages = {s["name"]: s for s in up.get("/stages")[1]["stages"]}
    ingress, egress = stages["ingress"]["counters"], stages["egress"]["counters"]
    assert ingress.get("bad_frames") == len(BAD["rule"]) + 1 + len(BAD["beats"]) + len(BAD["confirms"])
    assert egress.get("bad_frames") == len(BAD["results"])
    assert egress.get("bad_results") == len(BAD["bad_results"])
    assert stages["egress"]["depth"] == 0 and probe.received("pipeline/errors/") == []


def test_a_forged_confirm_releases_no_puback(broker, probe_factory, stack_factory):
    """The PUBACK of a message being processed must wait for its result, whatever reaches the confirms socket."""
    go = threading.Event()
    fake = FakeBroker([[go, publish(b"in/a", b'{"seq": 0}', 1, 4), Wait({4}),
                        publish(b"in/a", b'{"seq": 1, "sleep": 3}', 1, 5), Wait({5})]])
    probe = probe_factory("out/#")
    try:
        up = stack_factory(CONFIG.replace("LOCAL", broker.url).replace("broker: local, topic: \"in",
                                                                       "broker: odd, topic: \"in")
                           .replace("brokers:\n", f"brokers:\n  odd: {{url: {fake.url}, protocol: \"3.1.1\"}}\n"))
        go.set()
        first = probe.wait_for(1, timeout=20)
        boot = orjson.loads(first[0][1])["message_id"].rsplit("-", 1)[0]
        time.sleep(0.5)  # seq 1 is in the model now
        send_all(up, {"confirms": [[pack([[f"{boot}-2", "r", "odd", "forger"]])]]})
        time.sleep(0.5)
        early = list(fake.connections[0].pubacks)
        done = probe.wait_for(2, timeout=20)
        deadline = time.monotonic() + 10
        while 5 not in fake.connections[0].pubacks and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        fake.stop()
    assert early == [4]  # not 5: the forged confirm released nothing
    assert [orjson.loads(p)["seq"] for _, p in done] == [0, 1] and fake.connections[0].pubacks == [4, 5]
    ingress = next(s for s in up.get("/stages")[1]["stages"] if s["name"] == "ingress")
    assert ingress["counters"].get("forged_confirms") == 1
