"""One message through the model: the single place where per-message failures become error records."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from pipeline import codec, envelope, topics
from pipeline.envelope import Message, Result, result_for
from pipeline.filters import matches
from pipeline.model import Context, LoadedModel

if TYPE_CHECKING:  # pipeline.config loads pydantic; a stage gets its config from pipeline.frozen
    from pipeline.config import Rule


class Processor:
    def __init__(self, rule: Rule, model: LoadedModel, context: Context) -> None:
        self.rule, self.model, self.context = rule, model, context
        self.render = topics.compile_template(rule.pub.topic)
        self.error_topic = topics.compile_template(rule.error_topic)
        self.call_started = 0.0  # monotonic start of the running model call, 0 when idle (read by the watchdog)
        self.current: Message | None = None
        self.batch: tuple[Message, ...] = ()  # the frame being processed and its results so far
        self.done: list[Result] = []
        self.log = logging.getLogger("pipeline.worker")
        self.loaded_at = time.time()
        self.filtered = 0  # messages the rule's filter refused: answered with NOTHING, the model not called

    def run_batch(self, batch: list[Message]) -> list[Result]:
        self.batch, self.done = tuple(batch), []
        for msg in batch:
            self.done.append(self(msg))
        return self.done

    def abandon(self, reason: str) -> list[Result]:
        """What to send when the worker must die in the middle of a frame (see the watchdog).

        The results made so far, plus error records for the QoS 0 messages the worker will not get to
        (nobody retries those: at most once). QoS 1 ones are left to ingress, which dispatches them again.
        """
        out = list(self.done)
        for msg in self.batch[len(out):]:
            if msg.qos == 0:
                is_current = msg is self.current
                why = reason if is_current else f"worker restarted after {reason} on message {self.current.id}"
                out.append(self.error(msg, "timeout" if is_current else "not_processed", why, 0.0))
        return out

    def __call__(self, msg: Message) -> Result:
        try:
            event = codec.decode_event(msg.payload)
        except codec.BadPayload as e:
            return self.error(msg, "bad_payload", e, 0.0)
        if self.rule.filter is not None and not matches(self.rule.filter, event):
            self.filtered += 1
            return result_for(msg, envelope.NOTHING, "", b"", 0.0)
        ctx = self.context
        ctx.topic, ctx.received_at, ctx.message_id, ctx.attempt = msg.topic, msg.received_at, msg.id, msg.attempt
        self.current, t0 = msg, time.monotonic()
        self.call_started = t0
        try:
            value = self.model.handler(event, ctx)
        except (Exception, SystemExit) as e:  # SystemExit: a model calling sys.exit() costs one message only
            return self.error(msg, "model_error", e, time.monotonic() - t0)
        finally:
            self.call_started = 0.0
        took = time.monotonic() - t0
        if value is None:
            return result_for(msg, envelope.NOTHING, "", b"", took)
        try:
            payload = codec.encode_value(value)
            topic = self.render(msg.topic)
        except (codec.Unserialisable, IndexError) as e:
            return self.error(msg, "unserialisable_result", e, took)
        return result_for(msg, envelope.PUBLISH, topic, payload, took)

    def error(self, msg: Message, reason: str, err: BaseException | str, took: float) -> Result:
        self.log.warning("%s: %s", reason, err, extra={"message_id": msg.id})
        return envelope.error_result(msg, self.error_topic(msg.topic), reason, err, took)
