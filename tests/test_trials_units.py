"""The parts of shadows and canaries that need no stack: a key's share, a canary's judge, a shadow's agreement,
handing a rolled-back canary's backlog to the live queue."""

from __future__ import annotations

from types import SimpleNamespace

import orjson
import pytest

from pipeline import trials
from pipeline.stages.ingress.dispatch import RuleQueue
from pipeline.stages.ingress.trials import CanaryRoute, ShadowFeed
from pipeline.telemetry.readiness import not_ready
from pipeline.telemetry.reporter import Reporter
from pipeline.wire.frames import Message


def spec(**over: object) -> SimpleNamespace:
    base = {"model": "c", "percent": 10.0, "key": None, "max_error_rate": 0.01, "max_p99": None, "window": 5.0,
            "then": "rollback"}
    return SimpleNamespace(**{**base, **over})


def test_a_key_s_share_is_stable_and_spread():
    shares = [trials.key_share(f"in/d{i}/data") for i in range(10_000)]
    assert shares[:50] == [trials.key_share(f"in/d{i}/data") for i in range(50)]
    assert all(0 <= s < 100 for s in shares)
    assert 900 < sum(s < 10 for s in shares) < 1100


def test_a_canary_is_rolled_back_past_its_error_rate_once_the_window_holds_enough():
    judge = trials.CanaryJudge("r", spec())
    judge.add(0.0, 0.001, True)
    assert judge.judge(0.1) is None  # one error in one result: too few to judge
    for i in range(trials.MIN_RESULTS - 1):
        judge.add(0.1 + i / 100, 0.001, False)
    verdict = judge.judge(0.3)
    assert verdict["state"] == trials.ROLLED_BACK and "max_error_rate" in verdict["reason"]
    assert verdict["window"]["results"] == trials.MIN_RESULTS and judge.judge(0.4) is None  # decided once


def test_a_canary_is_rolled_back_past_its_p99_and_old_results_leave_the_window():
    judge = trials.CanaryJudge("r", spec(max_p99=0.05, window=2.0))
    for i in range(20):
        judge.add(i * 0.01, 0.2 if i < 10 else 0.001, False)
    assert judge.figures(3.0)["results"] == 0  # the window moved past them all
    judge = trials.CanaryJudge("r", spec(max_p99=0.05))
    for i in range(100):
        judge.add(i * 0.01, 0.2 if i == 0 else 0.001, False)
    assert judge.judge(1.0) is None  # one slow call in 100: p99 is under the limit
    judge.add(1.0, 0.2, False)
    assert "max_p99" in judge.judge(1.0)["reason"]


@pytest.mark.parametrize("then, state", [("promote", trials.PROMOTED), ("rollback", trials.ENDED)])
def test_a_canary_that_held_for_its_window_gets_what_then_says(then, state):
    judge = trials.CanaryJudge("r", spec(then=then))
    for i in range(trials.MIN_RESULTS):
        judge.add(i * 0.01, 0.001, False)
    assert judge.judge(4.9) is None
    assert judge.judge(10.0)["state"] == state  # its results left the window: the ones since the first count


def test_a_quiet_failing_canary_is_rolled_back_not_promoted():
    """A candidate with fewer than MIN_RESULTS results per window (a small share of a quiet rule) is never judged on
    its window alone; once a window has passed with MIN_RESULTS in all, its limits still hold before `then`: here
    every result is an error, and it was promoted."""
    judge = trials.CanaryJudge("r", spec(then="promote"))
    verdict, t = None, 0.0
    while verdict is None and t < 30:
        if round(t * 4) % 3 == 0:  # 1.33 results/s: under MIN_RESULTS per 5 s window
            judge.add(t, 0.001, True)
        verdict, t = judge.judge(t), t + 0.25
    assert verdict["state"] == trials.ROLLED_BACK and "max_error_rate" in verdict["reason"], verdict
    for limit, state in ((0.2, trials.PROMOTED), (0.1, trials.ROLLED_BACK)):
        judge = trials.CanaryJudge("r", spec(then="promote", max_error_rate=limit))
        for i in range(20):  # 3 errors of 20 since the first; the last window: 6 results, no error, too few to judge
            judge.add(float(i), 0.001, i < 3)
        verdict = judge.judge(19.0)
        assert verdict["state"] == state and verdict["window"]["results"] < trials.MIN_RESULTS, verdict
    assert "3 of 20 since its first result" in verdict["reason"]  # 15% over 10%: its window alone looked sound

def test_agreement_matches_the_two_versions_once_by_message_id():
    a = trials.Agreement()
    assert a.match("r", "m1", False, (0, b"x")) is None
    assert a.match("r", "m1", False, (0, b"x")) is None  # the same version again: still waiting
    assert a.match("r", "m1", True, (0, b"x")) is True
    assert a.match("r", "m2", True, (1, b"")) is None and a.match("r", "m2", False, (1, b"")) is True
    assert a.match("r", "m3", True, (0, b"y")) is None and a.match("r", "m3", False, (0, b"x")) is False
    for i in range(trials.AGREEMENT_PENDING + 5):
        a.match("r", f"n{i}", False, (2, b""))
    assert a.overflow() == ["r"] * 5 and len(a.pending) == trials.AGREEMENT_PENDING


def _msg(i: int, rule: str) -> Message:
    return Message(f"b-{i}", rule, "local", f"in/d{i}/data", b"{}", 1, i, 1, 0.0)


def test_a_rolled_back_canary_hands_what_waits_for_it_to_the_live_queue(tmp_path):
    stats = Reporter(None, "ingress")
    rule = SimpleNamespace(name="r", canary=spec(), backlog=100, overflow="drop_new", timeout=1.0)
    candidate_rule = SimpleNamespace(name="r~canary", backlog=100, overflow="drop_new", timeout=1.0)
    live = RuleQueue(rule, None, stats, lambda r: None, lambda t: t)
    candidate = RuleQueue(candidate_rule, None, stats, lambda r: None, lambda t: t)
    route = CanaryRoute(live, candidate, tmp_path, stats)
    served = [route.serving(f"in/d{i}/data", b"{}", []) for i in range(200)]
    assert 5 < sum(q is candidate for q in served) < 40
    live.offer(_msg(0, "r"))
    for i in (1, 2):
        candidate.offer(_msg(i, "r~canary"))
    candidate.retry.append(_msg(3, "r~canary")._replace(attempt=2))
    trials.write_verdict(tmp_path, {"rule": "r", "model": "c", "state": trials.ROLLED_BACK, "reason": "test"})
    route.tick(1.0)
    assert route.share == 0 and all(route.serving(f"in/d{i}/data", b"{}", []) is live for i in range(200))
    assert not candidate.backlogged
    assert [(m.id, m.rule) for m in live.pending] == [("b-1", "r"), ("b-2", "r"), ("b-0", "r")]
    assert [(m.id, m.rule, m.attempt) for m in live.retry] == [("b-3", "r", 2)]
    assert stats.counters["canary_handed_back.r"] == 3


def test_a_shadow_that_is_down_does_not_make_the_stack_unready():
    doc = {"stages": [{"name": "rule:r", "up": True}, {"name": "rule:r~shadow", "up": False, "trial": "shadow"},
                      {"name": "rule:r~canary", "up": False, "trial": "canary"}]}
    assert not_ready(doc) == ["rule:r~canary is down"]  # a canary serves live keys


def test_with_a_canary_too_the_shadow_is_compared_with_whichever_version_served(tmp_path):
    from pipeline.config import load as config
    from pipeline.stages.egress.trials import Trials
    from pipeline.wire.frames import PUBLISH, Result

    (tmp_path / "m").mkdir()
    (tmp_path / "c.yaml").write_text(
        "brokers: {local: {url: 'mqtt://127.0.0.1:1883'}}\nmodels: {a: {path: m}, b: {path: m}, c: {path: m}}\n"
        "rules:\n  - {name: r, sub: {broker: local, topic: t}, model: a, pub: {broker: local, topic: o},\n"
        "     shadow: {model: b}, canary: {model: c}}\n")
    stats = Reporter(None, "egress")
    egress = Trials(config.load(tmp_path / "c.yaml"), tmp_path, stats)

    def result(msg_id: str, rule: str, payload: bytes) -> Result:
        return Result(msg_id, rule, PUBLISH, "o", payload, "local", 0, 0, 0.0, 0.001)

    for msg_id, served_by, live_out, shadow_out in (("1", "r", b"x", b"x"), ("2", "r~canary", b"y", b"y"),
                                                    ("3", "r~canary", b"y", b"z")):
        egress.see(result(msg_id, served_by, live_out), 1.0)
        egress.see(result(msg_id, "r~shadow", shadow_out), 1.0)
    assert (stats.counters["shadow_compared.r"], stats.counters["shadow_agreed.r"]) == (3, 2)
    assert egress.judges["r~canary"].total == 2  # the canary's results are judged too


@pytest.mark.parametrize("percent", [100.0, 30.0, 12.5])
def test_a_shadow_gets_its_share_of_the_messages_and_egress_tells_which(percent):
    queue = SimpleNamespace(rule=SimpleNamespace(name="r~shadow"))
    feed = ShadowFeed(queue, percent)
    copies = [feed.copy(_msg(i, "r")) for i in range(10_000)]
    got = [c for c in copies if c is not None]
    assert abs(len(got) - 100 * percent) <= 100 * percent * 0.1
    assert all((c.rule, c.qos, c.mid, c.dup) == ("r~shadow", 0, 0, False) for c in got)
    assert {c.id for c in got} == {f"b-{i}" for i in range(10_000) if trials.sampled(f"b-{i}", percent)}


def test_egress_waits_for_a_shadow_s_result_only_for_the_messages_its_shadow_gets(tmp_path):
    from pipeline.config import load as config
    from pipeline.stages.egress.trials import Trials
    from pipeline.wire.frames import PUBLISH, Result

    (tmp_path / "m").mkdir()
    (tmp_path / "c.yaml").write_text(
        "brokers: {local: {url: 'mqtt://127.0.0.1:1883'}}\nmodels: {a: {path: m}, b: {path: m}}\n"
        "rules:\n  - {name: r, sub: {broker: local, topic: t}, model: a, pub: {broker: local, topic: o},\n"
        "     shadow: {model: b, percent: 40}}\n")
    egress = Trials(config.load(tmp_path / "c.yaml"), tmp_path, Reporter(None, "egress"))
    for i in range(1000):
        egress.see(Result(f"b-{i}", "r", PUBLISH, "o", b"x", "local", 0, 0, 0.0, 0.001), 1.0)
    assert {k[1] for k in egress.agreement.pending} == {f"b-{i}" for i in range(1000) if trials.sampled(f"b-{i}", 40)}


def _canary_config(tmp_path):
    from pipeline.config import load as config

    (tmp_path / "m").mkdir()
    (tmp_path / "c.yaml").write_text(
        "brokers: {local: {url: 'mqtt://127.0.0.1:1883'}}\nmodels: {a: {path: m}, c: {path: m}}\n"
        "rules:\n  - {name: r, sub: {broker: local, topic: t}, model: a, pub: {broker: local, topic: o},\n"
        "     canary: {model: c}}\n")
    return config.load(tmp_path / "c.yaml")


def test_a_verdict_file_that_is_not_one_stops_no_stage(tmp_path):
    """A verdict file nested too deep for json (RecursionError), or whose state is not a string, is read as no
    verdict, or shown as it is: neither ingress, egress nor GET /models fails on it."""
    from pipeline.control.trials import trials as shown
    from pipeline.stages.egress.trials import Trials

    cfg = _canary_config(tmp_path)
    (tmp_path / "canaries").mkdir()
    path = tmp_path / "canaries" / "r.json"
    path.write_bytes(b"[" * 100_000 + b"]" * 100_000)
    stats = Reporter(None, "ingress")
    rule = SimpleNamespace(name="r", canary=spec(), backlog=100, overflow="drop_new", timeout=1.0)
    candidate = SimpleNamespace(name="r~canary", backlog=100, overflow="drop_new", timeout=1.0)
    route = CanaryRoute(RuleQueue(rule, None, stats, print, str), RuleQueue(candidate, None, stats, print, str),
                        tmp_path, stats)
    route.tick(1.0)
    assert route.verdict is None and route.share == 10.0
    assert "r~canary" in Trials(cfg, tmp_path, Reporter(None, "egress")).judges
    assert shown(cfg, [], tmp_path)[0]["state"] == "running"
    path.write_text(orjson.dumps({"run": trials.run_id(), "state": ["rolled_back"]}).decode())
    assert shown(cfg, [], tmp_path)[0]["serving_percent"] == 0.0


def test_egress_keeps_a_verdict_it_cannot_write_and_writes_it_later(tmp_path):
    """A verdict egress cannot write (a full disk; here a file where the canaries folder goes) is counted and
    written at a later judgement; egress goes on."""
    from pipeline.stages.egress.trials import Trials
    from pipeline.wire.frames import ERROR, Result

    stats = Reporter(None, "egress")
    egress = Trials(_canary_config(tmp_path), tmp_path, stats)
    (tmp_path / "canaries").write_text("in the way")
    for i in range(trials.MIN_RESULTS):
        egress.see(Result(f"b-{i}", "r~canary", ERROR, "e", b"{}", "local", 0, 0, 0.0, 0.001), 1.0)
    egress.tick(1.0)
    assert stats.counters["canary_verdict_unwritten"] == 1 and "r~canary" in egress.judges
    (tmp_path / "canaries").unlink()
    egress.tick(2.0)
    assert trials.read_verdict(tmp_path, "r")["state"] == trials.ROLLED_BACK and not egress.judges
    assert stats.counters["canary_rolled_back.r"] == 1


def test_what_waits_for_a_shadow_s_result_holds_no_payload(tmp_path):
    """Up to AGREEMENT_PENDING live results wait for their shadow's (a slow shadow drops copies, so many never
    come): each must cost a few bytes, not its payload (10,000 results of 1 MiB would hold 10 GB in egress)."""
    from pipeline.config import load as config
    from pipeline.stages.egress.trials import Trials
    from pipeline.wire.frames import PUBLISH, Result

    (tmp_path / "m").mkdir()
    (tmp_path / "c.yaml").write_text(
        "brokers: {local: {url: 'mqtt://127.0.0.1:1883'}}\nmodels: {a: {path: m}, b: {path: m}}\n"
        "rules:\n  - {name: r, sub: {broker: local, topic: t}, model: a, pub: {broker: local, topic: o},\n"
        "     shadow: {model: b}}\n")
    stats = Reporter(None, "egress")
    egress = Trials(config.load(tmp_path / "c.yaml"), tmp_path, stats)
    for i in range(100):
        egress.see(Result(f"b-{i}", "r", PUBLISH, "o", bytes([i]) * 100_000, "local", 0, 0, 0.0, 0.001), 1.0)
    assert sum(len(v[2]) for v in egress.agreement.pending.values()) <= 100 * 32
    egress.see(Result("b-1", "r~shadow", PUBLISH, "o", bytes([1]) * 100_000, "local", 0, 0, 0.0, 0.001), 1.0)
    egress.see(Result("b-2", "r~shadow", PUBLISH, "o", bytes([1]) * 100_000, "local", 0, 0, 0.0, 0.001), 1.0)
    assert (stats.counters["shadow_compared.r"], stats.counters["shadow_agreed.r"]) == (2, 1)
