"""What `FastClient.take_publishes` costs per QoS 1 PUBLISH: 3.1.1, MQTT 5 without properties, and MQTT 5 with
Subscription Identifiers (one per copy on an ingress link). CPU time, the least of REPEATS rounds (a shared
box's load then shows little). Run from the repository: `.venv/bin/python benchmarks/fastpaho_take.py [OLD]`,
where OLD is an earlier fastpaho.py (`git show REV:pipeline/wire/fastpaho.py > old.py`) measured alongside.
"""

from __future__ import annotations

import importlib.util
import socket
import sys
import time
from types import ModuleType

import paho.mqtt.client as mqtt

from pipeline.wire import fastpaho

N, ROUNDS, REPEATS = 200, 100, 60
CASES = {  # name: (properties, MQTT 5)
    "3.1.1": (b"", False),
    "5, no properties": (b"", True),
    "5, one 1-byte id": (b"\x0b\x05", True),
    "5, one 2-byte id": (b"\x0b\xa3\x45", True),
    "5, id + user property": (b"\x0b\x05\x26\x00\x01k\x00\x01v", True),
}


def packet(props: bytes, v5: bool) -> bytes:
    topic = b"in/dev3/data"
    body = len(topic).to_bytes(2, "big") + topic + b"\x12\x34"
    if v5:
        body += bytes([len(props)]) + props
    body += b'{"seq": 12345, "value": 3.14}'
    return bytes([0x32, len(body)]) + body


def per_message(mod: ModuleType, pkt: bytes, proto: int) -> float:
    c = mod.FastClient(mqtt.CallbackAPIVersion.VERSION2, protocol=proto)
    c._sock, _peer = socket.socketpair()
    data = pkt * N
    t = time.process_time()
    for _ in range(ROUNDS):
        c._rbuf, c._rpos = data, 0
        c.take_publishes(lambda *_a: None, limit=N)
    return (time.process_time() - t) / (N * ROUNDS)


def main() -> None:
    mods = {"now": fastpaho}
    if len(sys.argv) > 1:
        spec = importlib.util.spec_from_file_location("old_fastpaho", sys.argv[1])
        assert spec is not None and spec.loader is not None
        mods = {"old": importlib.util.module_from_spec(spec), **mods}
        spec.loader.exec_module(mods["old"])
    for name, (props, v5) in CASES.items():
        pkt, proto = packet(props, v5), mqtt.MQTTv5 if v5 else mqtt.MQTTv311
        best = dict.fromkeys(mods, 1.0)
        for _ in range(REPEATS):  # interleaved: a burst of load hits both alike
            for label, mod in mods.items():
                best[label] = min(best[label], per_message(mod, pkt, proto))
        print(f"{name:24s}" + "".join(f"  {label} {t * 1e9:5.0f} ns" for label, t in best.items()))


if __name__ == "__main__":
    main()
