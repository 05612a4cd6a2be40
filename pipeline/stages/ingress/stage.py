"""The ingress stage: MQTT subscriptions of every rule -> frames to each rule's workers.

One thread does everything (see `mqtt.Hub`): paho's on_message runs inside the poll loop and only queues
the message in its rules' `RuleQueue`s. QoS 1 messages are acknowledged to the broker with manual acks,
in arrival order, once egress confirms every rule's result is safe (`AckWindow`); the session is persistent
(clean_session=False, a stable client id), so whatever was not acked comes again after any crash. A message of a
rule with a canary waits for one confirm under the rule's name, whichever version serves it; a copy for a shadow is
never waited for (see pipeline.stages.ingress.trials).
"""

from __future__ import annotations

import base64
import logging
import os
import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import zmq

from pipeline import topics
from pipeline.config.schema.behaviour import CANARY, SHADOW
from pipeline.keyed import keys, store
from pipeline.models import codec
from pipeline.stages.ingress import feedback
from pipeline.stages.ingress.acks import AckWindow
from pipeline.stages.ingress.dispatch import RuleQueue
from pipeline.stages.ingress.keyed import KeyedQueue, StateReader
from pipeline.stages.ingress.pace import ReadPace
from pipeline.stages.ingress.tap import Taps
from pipeline.stages.ingress.trials import CanaryRoute, ShadowFeed
from pipeline.telemetry.reporter import Reporter
from pipeline.wire import frames
from pipeline.wire.endpoints import Endpoints
from pipeline.wire.frames import Message, Result
from pipeline.wire.mqtt import Hub, Link
from pipeline.wire.sockets import drain

if TYPE_CHECKING:  # pipeline.config.load loads pydantic; a stage gets its config from pipeline.config.snapshot
    from pipeline.config.load import Config, Rule

log = logging.getLogger("pipeline.ingress.stage")  # a stable name for log filters, not the module path

TICK = 0.2
EGRESS_GRACE = 1.0  # seconds a (re)started egress has to confirm what workers answered before it came
LETTERS_PER_FRAME = 100  # error records sent again in one frame
MAX_LETTERS = 100_000  # QoS 1 error records of ingress's own whose confirm is awaited (oldest forgotten past it)
RECENT_CONFIRMS = 10_000  # confirms remembered to tell a duplicate from a forged one


class Router:
    """(broker, topic, subscription ids) -> indices of the rules a copy of a message feeds, memoised (device
    topics repeat).

    Over MQTT 3.1.1 a broker sends a client one copy of a message however many of its subscriptions match, and
    that copy feeds every rule whose filter matches the topic. Over MQTT 5 it may send one copy per matching
    subscription (Mosquitto 2 does), each carrying the Subscription Identifier of the subscription(s) it was
    sent for: a copy then feeds only the rules of those subscriptions, so each rule gets each message once
    and each copy is acked once its own rules confirmed it. A copy whose ids name no subscription of a rule
    matching its topic feeds no rule: it was sent for a subscription an earlier configuration made, which the
    persistent session keeps (ingress never unsubscribes), and the rules now matching get their own copies.
    A copy without ids (MQTT 3.1.1; a subscription made before ids were used) feeds every matching rule. The
    companions of shadows and canaries are never routed to here: the rule they try a candidate for hands them
    their messages (see pipeline.stages.ingress.trials)."""

    def __init__(self, cfg: Config, sub_ids: list[int]) -> None:
        self._subs = [(i, r.sub.broker, r.sub.topic, sid) for (i, r), sid in zip(enumerate(cfg.rules), sub_ids,
                                                                                   strict=True) if r.trial is None]
        self._cache: dict[tuple[str, str, tuple[int, ...]], tuple[int, ...]] = {}

    def __call__(self, broker: str, topic: str, subs: tuple[int, ...] = ()) -> tuple[int, ...]:
        key = (broker, topic, subs)
        hit = self._cache.get(key)
        if hit is None:
            if len(self._cache) > 100_000:
                self._cache.clear()
            matching = [(i, sid) for i, b, f, sid in self._subs if b == broker and topics.matches(f, topic)]
            hit = self._cache[key] = tuple(i for i, sid in matching if not subs or sid in subs)
        return hit


def run(cfg: Config, eps: Endpoints, stop: threading.Event) -> None:
    """Serve until `stop` is set, then drain: stop intake, let in-flight work finish, ack it, leave."""
    ingress = Ingress(cfg, eps)
    try:
        ingress.serve(stop)
        ingress.drain(time.monotonic() + max(r.timeout for r in cfg.rules) + 2.0)
    finally:
        ingress.close()


class Ingress:
    """The ingress stage of a stack: owns the MQTT links of every broker rules subscribe on, each rule's
    `RuleQueue` and the `AckWindow` of each link. A message is acknowledged upstream only once every rule it feeds
    confirmed its result (QoS 1), and every message received is counted once: dispatched, unrouted or dropped."""

    def __init__(self, cfg: Config, eps: Endpoints) -> None:
        ctx = zmq.Context.instance()
        self.cfg, self.stats = cfg, Reporter.connect(eps, "ingress")
        self.guard = eps.guard(ctx)  # lets authorized remote workers in (endpoints.remote), else None
        self.routers = [eps.bind(ctx, zmq.ROUTER, "rule", i) for i in range(len(cfg.rules))]
        self.beats, self.confirms = eps.bind(ctx, zmq.PULL, "beats"), eps.bind(ctx, zmq.PULL, "confirms")
        self.letters = eps.connect(ctx, zmq.PUSH, "results")
        self.states = StateReader(store.path_in(cfg.default_data_dir()))
        self.queues = [self._queue(r, s) for r, s in zip(cfg.rules, self.routers, strict=True)]
        self.by_name = {r.name: q for r, q in zip(cfg.rules, self.queues, strict=True)}
        self._trials(eps)
        self.links = _links(cfg, self._arrive)
        for name, link in self.links.items():
            link.on_bad_topic = lambda raw, p, qos, mid, dup, b=name: self._bad_topic(b, raw, p, qos, mid, dup)
        self.acks = {name: AckWindow(link.client) for name, link in self.links.items()}
        for link in self.links.values():
            link.on_connected = lambda lk: self.acks[lk.name].reset()  # a new session: old packet ids are void
        self.hub = Hub(list(self.links.values()))
        for s in (*self.routers, self.beats, self.confirms):
            self.hub.register(s)
        sub_ids = [self.links[r.sub.broker].sub_ids[_filter(r)] for r in cfg.rules]
        self.route, self.boot, self.seq = Router(cfg, sub_ids), os.urandom(3).hex(), 0
        self.letters_out: OrderedDict[tuple[str, str], Result] = OrderedDict()  # QoS 1 error records not confirmed
        self.confirmed: OrderedDict[tuple[str, str], None] = OrderedDict()  # the last RECENT_CONFIRMS accepted
        self.taps = Taps(eps.run_dir, [(r.name, r.model, _filter(r)) for r in cfg.rules]).start()
        self._gauges()

    def _trials(self, eps: Endpoints) -> None:
        """The shadow and canary queues of each rule that has them; the rule a message's ack waits for, per queue
        (a canary's: the rule it tries a candidate for; a shadow's own name, which no ack waits for: its confirms,
        of a keyed shadow, release nothing); the queues whose backlog paces MQTT reads (not shadows)."""
        index = {q.rule.name: i for i, q in enumerate(self.queues)}
        self.shadows: dict[int, ShadowFeed] = {}
        self.canaries: dict[int, CanaryRoute] = {}
        self.ack_as = {q.rule.name: q.rule.trial_of if q.rule.trial == CANARY else q.rule.name for q in self.queues}
        for q in self.queues:
            live = index.get(q.rule.trial_of or "")
            if live is not None and q.rule.trial == SHADOW:
                self.shadows[live] = ShadowFeed(q, self.queues[live].rule.shadow.percent)
            elif live is not None:
                self.canaries[live] = CanaryRoute(self.queues[live], q, eps.run_dir, self.stats)
        self.paced = [q for q in self.queues if q.rule.trial != SHADOW]

    def _queue(self, rule: Rule, sock: zmq.Socket) -> RuleQueue:
        """The dispatch of one rule: per key when it has `key:`."""
        error_topic = topics.compile_template(rule.error_topic)
        if rule.key is None:
            return RuleQueue(rule, sock, self.stats, self.letters_send, error_topic)
        return KeyedQueue(rule, sock, self.stats, self.letters_send, error_topic, self.states)

    def _gauges(self) -> None:
        g = self.stats.gauges
        g["brokers"] = lambda: {n: lk.state for n, lk in self.links.items()}
        g["protocols"] = lambda: {n: lk.chosen for n, lk in self.links.items() if lk.chosen}
        g["depth"] = lambda: sum(q.depth for q in self.queues)
        g["rules"] = lambda: {q.rule.name: q.levels() for q in self.queues}
        g["unacked"] = lambda: {n: len(a) for n, a in self.acks.items()}

    def serve(self, stop: threading.Event) -> None:
        """The loop: MQTT input is read as it comes, or in spaced reads when it is fast or workers lag
        (see `pipeline.stages.ingress.pace`)."""
        log.info("ingress up: %d rule(s) on %d broker(s)", len(self.queues), len(self.links))
        next_tick = 0.0
        hub, pace = self.hub, ReadPace()
        while not stop.is_set():
            self._handle(hub.poll(pace.timeout_ms(time.monotonic())))
            now = time.monotonic()
            for q in self.queues:
                q.dispatch(now)
            hub.flush()
            hub.reading = pace.step(now, self.seq, any(q.backlogged for q in self.paced))
            if now >= next_tick:
                next_tick = now + TICK
                self._tick(now)

    def _tick(self, now: float) -> None:
        for q in self.queues:
            q.expire(now)
        for route in self.canaries.values():
            route.tick(now)
        malformed = sum(lk.malformed for lk in self.links.values())
        if malformed:
            self.stats.counters["malformed_packets"] = malformed  # each closed a connection (see Link.read)
        self.stats.tick()

    def _arrive(self, broker: str, topic: str, payload: bytes, qos: int, mid: int, dup: bool,
                subs: tuple[int, ...]) -> None:
        """One MQTT message (one copy of it, over MQTT 5: see `Router`), from inside hub.poll() on this thread
        (paho's on_message or the fast path)."""
        self.seq += 1
        msg_id, now = f"{self.boot}-{self.seq}", time.time()
        waiting: set[str] = set()
        targets = self.route(broker, topic, subs)
        if self.taps.on:  # a recording runs (see stages/ingress/tap.py)
            self.taps.keep(targets, topic, payload, qos, now)
        memo: list[Any] = []  # the payload decoded, once for every keyed rule that reads its key from it
        for i in targets:
            q = self.queues[i]
            m = Message(msg_id, q.rule.name, broker, topic, payload, qos, mid, 1, now, dup=dup)
            if qos:
                waiting.add(q.rule.name)
            if len(payload) > q.rule.max_payload_bytes:  # the rule's error, never a candidate's
                self.stats.count("oversize")
                err = f"payload of {len(payload)} bytes is over max_payload_bytes ({q.rule.max_payload_bytes})"
                self.letters_send(frames.error_result(m, q.error_topic(topic), "payload_too_large", err))
                continue
            route = self.canaries.get(i)
            serving = q if route is None else route.serving(topic, payload, memo)
            if serving is not q:
                m = m._replace(rule=serving.rule.name)
            self._offer(serving, m, memo)
            copy = self.shadows[i].copy(m) if i in self.shadows else None
            if copy is not None:
                self._offer(self.shadows[i].queue, copy, memo)
        if qos:
            self.acks[broker].add(msg_id, mid, waiting)
        self._count_arrival(broker, topic, subs, bool(targets), dup)

    def _count_arrival(self, broker: str, topic: str, subs: tuple[int, ...], routed: bool, dup: bool) -> None:
        self.stats.count("received")
        if dup:
            self.stats.count("redelivered")  # the broker sent it again: its result may be a duplicate
        if not routed:
            self.stats.count("unrouted")
            if subs and self.route(broker, topic):
                self.stats.count("stale_subscription")  # see Router

    def _offer(self, q: RuleQueue, m: Message, memo: list[Any]) -> None:
        if isinstance(q, KeyedQueue):
            self._offer_keyed(q, m, memo)
        else:
            q.offer(m)

    def _offer_keyed(self, q: KeyedQueue, m: Message, memo: list[Any]) -> None:
        """Queue `m` behind its key's messages; without a key value (and no key_default), an error record: `no_key`,
        or `bad_payload` when the key is read from a payload that is not JSON."""
        try:
            q.offer(m._replace(key=q.key_of(m.topic, m.payload, memo)))
        except keys.NoKey as e:
            self.stats.count(f"no_key.{q.rule.name}")
            self.letters_send(frames.error_result(m, q.error_topic(m.topic), "no_key", e))
        except codec.BadPayload as e:
            self.stats.count(f"no_key.{q.rule.name}")
            self.letters_send(frames.error_result(m, q.error_topic(m.topic), "bad_payload", e))

    def _bad_topic(self, broker: str, raw: bytes, payload: bytes, qos: int, mid: int, dup: bool) -> None:
        """A message whose topic is not UTF-8: an error record (the topic in base64, the payload kept) on the
        error topic of each rule whose filter matches the topic read with replacement characters; acked like
        any other once those records are safe (at once when no rule matches)."""
        self.seq += 1
        msg_id, now = f"{self.boot}-{self.seq}", time.time()
        shown = raw.decode("utf-8", "replace")
        encoded = base64.b64encode(raw).decode("ascii")
        self.stats.reject("bad_topic", f"broker {broker}: a topic that is not UTF-8 (base64 {encoded[:80]})")
        waiting: set[str] = set()
        for i in self.route(broker, shown):
            q = self.queues[i]
            m = Message(msg_id, q.rule.name, broker, encoded, payload, qos, mid, 1, now)
            if qos:
                waiting.add(q.rule.name)
            self.letters_send(frames.error_result(m, q.error_topic(shown), "bad_topic",
                                                    "the topic is not UTF-8; 'topic' holds its bytes in base64"))
        if qos:
            self.acks[broker].add(msg_id, mid, waiting)

    def _letter_confirmed(self, key: tuple[str, str], broker: str) -> bool:
        """Whether (rule, message id) is an error record ingress sent itself, of a message from `broker`
        (forgotten once true)."""
        letter = self.letters_out.get(key)
        if letter is None or letter.source_broker != broker:
            return False
        del self.letters_out[key]
        return True

    def letters_send(self, result: Result) -> None:
        """Dead letters and rejected messages go straight to egress as error records; a QoS 1 one is kept
        until egress confirms it, and sent again when egress (re)starts (an egress that died may not have
        stored it)."""
        if result.source_qos:
            self.letters_out[(result.rule, result.message_id)] = result
            if len(self.letters_out) > MAX_LETTERS:  # egress gone for very long: the oldest wait for redelivery
                self.letters_out.popitem(last=False)
                self.stats.count("letters_forgotten")
        self.letters.send(frames.encode([result]))

    def _resend_letters(self) -> None:
        """Send every error record not yet confirmed again, in frames of at most LETTERS_PER_FRAME."""
        late = list(self.letters_out.values())
        if late:
            log.info("sending %d error record(s) again: the egress that had them restarted", len(late))
        for i in range(0, len(late), LETTERS_PER_FRAME):
            self.letters.send(frames.encode(late[i:i + LETTERS_PER_FRAME]))

    def _handle(self, ready: set[zmq.Socket]) -> None:
        now = time.monotonic()
        for i, sock in enumerate(self.routers):
            if sock in ready:
                for parts in drain(sock, multipart=True):
                    try:
                        ident, n = feedback.credit(parts)
                    except feedback.BadFrame as e:
                        self.stats.reject("bad_frames", f"rule {self.queues[i].rule.name}'s socket: {e}")
                        continue
                    self.queues[i].on_credit(ident, n, now)
        if self.beats in ready:
            self._beats(now)
        if self.confirms in ready:
            self._confirms(now)

    def _beats(self, now: float) -> None:
        for frame in drain(self.beats):
            try:
                b = feedback.beat(frame, len(self.queues))
            except feedback.BadFrame as e:
                self.stats.reject("bad_frames", f"beats: {e}")
                continue
            if b.kind == frames.BEAT:
                self.queues[b.index].on_beat(b.ident, b.free, now)
            else:
                self.queues[b.index].on_timeout(b.ident, b.msg_id, b.answered, now)

    def _confirms(self, now: float) -> None:
        for frame in drain(self.confirms):
            try:
                confirms = feedback.confirms(frame)
            except feedback.BadFrame as e:
                self.stats.reject("bad_frames", f"confirms: {e}")
                continue
            if confirms is None:  # a (re)started egress: results answered before it came are lost
                for q in self.queues:
                    q.hasten(now + EGRESS_GRACE)
                self._resend_letters()
                continue
            for c in confirms:
                self._confirm(c)

    def _confirm(self, c: feedback.Confirm) -> None:
        """Egress has a result safe: accepted only for a message this ingress has in flight at that rule and
        from the worker holding it, or for an error record ingress sent itself; anything else releases no
        PUBACK and is counted."""
        q, acks = self.by_name.get(c.rule), self.acks.get(c.broker)
        if q is None or acks is None:
            self.stats.reject("bad_frames", f"confirms: unknown rule {c.rule!r:.80} or broker {c.broker!r:.80}")
            return
        sender = c.sender.encode()
        held = q.in_flight.get(c.msg_id)
        holder = held[1] if held is not None else None
        key = (c.rule, c.msg_id)
        if (held is not None and holder == sender and held[0].broker == c.broker) or \
                (not c.sender and self._letter_confirmed(key, c.broker)):
            if c.stale and isinstance(q, KeyedQueue):  # not stored: it goes again, after the state it missed
                q.again_stale(c.msg_id)
                return
            q.confirm(c.msg_id, c.state)
            acks.done(c.msg_id, self.ack_as[c.rule])
            self.confirmed[key] = None
            if len(self.confirmed) > RECENT_CONFIRMS:
                self.confirmed.popitem(last=False)
        elif not c.msg_id.startswith(f"{self.boot}-"):
            self.stats.count("stale_confirms")  # a message of an earlier ingress: its session is gone
        elif key in self.confirmed or sender in q.workers or sender in q.buried:
            self.stats.count("late_confirms")  # a worker answered a message taken back from it: both answers count
        else:
            self.stats.reject("forged_confirms", f"a confirm of {c.msg_id!r:.80} for rule {c.rule!r:.80} from "
                              f"{c.sender!r:.80}, which does not hold it")

    def drain(self, deadline: float) -> None:
        """Stop reading MQTT; wait (until `deadline`) for what workers hold; the rest comes again later."""
        self.hub.reading = False
        for q in self.queues:
            self.stats.count(f"dropped.{q.rule.name}", q.clear_backlog())
        log.info("ingress draining: %d message(s) in workers", sum(q.holding for q in self.paced))
        while time.monotonic() < deadline and any(q.holding for q in self.paced):
            self._handle(self.hub.poll(50))
            self.hub.flush()
        self.stats.tick(force=True)

    def close(self) -> None:
        self.taps.close()
        for link in self.links.values():
            link.stop()
        self.stats.close()
        for s in (*self.routers, self.beats, self.confirms):
            s.close(linger=0)
        self.letters.close(linger=2000)
        self.states.close()
        if self.guard is not None:
            self.guard.stop()


def _links(cfg: Config, arrive: object) -> dict[str, Link]:
    links: dict[str, Link] = {}
    for rule in cfg.live_rules():  # a shadow or canary shares its rule's subscription
        name = rule.sub.broker
        if name not in links:
            link = links[name] = Link(name, cfg.brokers[name], f"{cfg.instance}-ingress-{name}",
                                      clean_session=False, manual_ack=True)
            link.on_publish = lambda t, p, q, mid, dup, subs, b=name: arrive(b, t, p, q, mid, dup, subs)
        links[name].subscribe(rule.sub.topic, rule.sub.qos, rule.sub.share)
    return links


def _filter(rule: Rule) -> str:
    """The filter of a rule's subscription as its link names it (shared: with the $share/GROUP/ prefix)."""
    return f"$share/{rule.sub.share}/{rule.sub.topic}" if rule.sub.share else rule.sub.topic
