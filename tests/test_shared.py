"""Scale-out: two stacks (two `pipeline up`, two names) share a topic through an MQTT 5 shared subscription.

20,000 QoS 1 messages go to one Mosquitto; a rule with `sub.share: g1` in both stacks splits them: every seq is
processed exactly once across the two (no loss, no duplicate in a clean run) and each stack takes at least 25%.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from conftest import HERE, Probe, Up, free_port

N = 20_000
RATE = 4000  # messages per second offered: fast, but paced so the test does not measure the broker's queues

CONFIG = """
name: NAME
brokers:
  local: {url: URL, protocol: 5}
models:
  probe: {path: MODELS/probe, params: {tag: TAG}}
rules:
  - name: split
    sub: {broker: local, topic: "load/+", qos: 1, share: g1}
    model: probe
    pub: {broker: local, topic: "done/{1}", qos: 1}
    workers: 2
control: {listen: CONTROL}
"""


@pytest.fixture
def two_stacks(broker, tmp_path: Path) -> Iterator[list[Up]]:
    stacks = []
    for tag in ("a", "b"):
        d = tmp_path / tag
        d.mkdir()
        control = f"127.0.0.1:{free_port()}"
        text = (CONFIG.replace("NAME", f"shared-{tag}").replace("URL", broker.url).replace("TAG", tag)
                .replace("MODELS", str(HERE / "models")).replace("CONTROL", control))
        (d / "pipeline.yaml").write_text(text)
        stacks.append(Up(d / "pipeline.yaml", d / "run", control))
    try:
        for up in stacks:
            up.wait_ready(60)
        yield stacks
    finally:
        for up in stacks:
            up.stop(60)
            for pid in up.pids():
                os.kill(pid, signal.SIGKILL)


def publish_paced(probe: Probe, n: int, rate: int) -> None:
    t0, batch = time.monotonic(), 200
    for start in range(0, n, batch):
        for seq in range(start, min(start + batch, n)):
            probe.publish(f"load/d{seq % 16}", orjson.dumps({"seq": seq}), qos=1)
        ahead = (start + batch) / rate - (time.monotonic() - t0)
        if ahead > 0:
            time.sleep(ahead)


def wait_outputs(probe: Probe, n: int, timeout: float) -> list[dict]:
    deadline, seen = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        got = probe.received("done/")
        if len({orjson.loads(p)["seq"] for _t, p in got}) >= n:
            time.sleep(1.0)  # a duplicate would come right after
            break
        if len(got) == seen:
            time.sleep(0.5)
        seen = len(got)
    return [orjson.loads(p) for _t, p in probe.received("done/")]


def test_shared_subscription_splits_exactly_once(broker, two_stacks):
    out = Probe(broker.port, "done/#")
    src = Probe(broker.port)
    try:
        publish_paced(src, N, RATE)
        results = wait_outputs(out, N, timeout=180)
    finally:
        src.close()
        out.close()
    counts = Counter(r["seq"] for r in results)
    missing = set(range(N)) - set(counts)
    duplicates = sum(c - 1 for c in counts.values())
    by_stack = Counter(r["tag"] for r in results)
    print(f"shared subscription: {len(results)} results, by stack {dict(by_stack)}, missing {len(missing)}, "
          f"duplicates {duplicates}")
    assert not missing, f"{len(missing)} seqs never processed, e.g. {sorted(missing)[:10]}"
    assert duplicates != N, "each stack got every message: the subscription was not shared (does ingress pass " \
        "rule.sub.share to Link.subscribe?)"
    assert duplicates == 0
    assert min(by_stack["a"], by_stack["b"]) >= N // 4, by_stack
    received = [up.get("/stages")[1]["stages"][0]["received"] for up in two_stacks]
    assert sum(received) == N, received  # each message reached exactly one stack's ingress


@pytest.mark.parametrize("protocol, problem", [
    (None, None),  # auto: the link refuses to subscribe if the broker turns out to speak only 3.1.1
    ('"3.1.1"', 'rules[0].sub.share: a shared subscription needs MQTT 5: set brokers.local.protocol: "5" (or auto)'),
    ("5", None),  # YAML reads 5 as a number: accepted as "5"
    ('"5"', None),
])
def test_share_needs_mqtt5(tmp_path, protocol, problem):
    from pipeline.config import load as config
    from pipeline.errors import ConfigError

    text = CONFIG.replace("NAME", "s").replace("URL", "mqtt://127.0.0.1:1883").replace("TAG", "a")
    text = text.replace("MODELS", str(HERE / "models")).replace("CONTROL", "127.0.0.1:5888")
    text = text.replace(", protocol: 5}", f", protocol: {protocol}}}" if protocol else "}")
    (tmp_path / "p.yaml").write_text(text)
    if problem is None:
        cfg = config.load(tmp_path / "p.yaml")
        assert cfg.brokers["local"].protocol == ("auto" if protocol is None else "5") and cfg.rules[0].sub.share == "g1"
        return
    with pytest.raises(ConfigError) as e:
        config.load(tmp_path / "p.yaml")
    assert any(p.startswith(problem) for p in e.value.problems), e.value.problems


def test_share_on_the_embedded_broker_is_refused_at_check(tmp_path):
    """The embedded broker (amqtt) speaks only MQTT 3.1.1, so `auto` cannot reach 5 there: refused when loading."""
    from pipeline.config import load as config
    from pipeline.errors import ConfigError

    text = CONFIG.replace("NAME", "s").replace("URL", "embedded://127.0.0.1:1883").replace("TAG", "a")
    text = text.replace("MODELS", str(HERE / "models")).replace("CONTROL", "127.0.0.1:5888")
    (tmp_path / "p.yaml").write_text(text.replace(", protocol: 5}", "}"))
    with pytest.raises(ConfigError) as e:
        config.load(tmp_path / "p.yaml")
    assert any(p.startswith("rules[0].sub.share: a shared subscription needs MQTT 5, and the embedded broker speaks "
                            "only 3.1.1") for p in e.value.problems), e.value.problems
