"""Messages through the model, one call each or a frame per `handler_batch` call: the single place where
per-message failures become error records."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import msgpack

from pipeline import topics
from pipeline.keyed import store
from pipeline.models import codec
from pipeline.models.filters import matches
from pipeline.models.loader import Context, LoadedModel, Meta, check_batch
from pipeline.wire import frames
from pipeline.wire.frames import Message, Result, result_for

if TYPE_CHECKING:  # pipeline.config.load loads pydantic; a stage gets its config from pipeline.config.snapshot
    from pipeline.config.load import Rule


class Processor:
    """Runs one rule's model on frames: owns the loaded model and its context, the filter and the topic
    templates. Returns exactly one `Result` per `Message`, in frame order; a failing message becomes an error
    record and never stops the frame."""

    def __init__(self, rule: Rule, model: LoadedModel, context: Context) -> None:
        self.rule, self.model, self.context = rule, model, context
        self.render = topics.compile_template(rule.pub.topic)
        self.error_topic = topics.compile_template(rule.error_topic)
        self.call_started = 0.0  # monotonic start of the running model call, 0 when idle (read by the watchdog)
        self.calling: tuple[Message, ...] = ()  # the messages of the running (or last) model call
        self.batch: tuple[Message, ...] = ()  # the frame being processed and its results so far
        self.done: list[Result] = []
        self.log = logging.getLogger("pipeline.worker")
        self.loaded_at = time.time()
        self.filtered = 0  # messages the rule's filter refused: answered with NOTHING, the model not called

    def run_batch(self, batch: list[Message]) -> list[Result]:
        """The results of one frame, in its order. A model with handler_batch gets the frame's events in one
        call; a message on its second attempt or later is called alone (it may be the one that stopped a
        worker: alone, it costs only itself)."""
        self.batch, self.done = tuple(batch), []
        if self.model.handler_batch is None or len(batch) == 1:
            for msg in batch:
                self.done.append(self(msg))
            return self.done
        results: dict[int, Result] = {}
        events: list[Any] = []
        todo: list[int] = []
        for i, msg in enumerate(batch):
            if msg.attempt == 1:
                event, refused = self._event(msg)
                if refused is not None:
                    results[i] = refused
                else:
                    events.append(event)
                    todo.append(i)
        if events:
            results.update(zip(todo, self._call_batch([batch[i] for i in todo], events), strict=True))
        for i, msg in enumerate(batch):
            if i not in results:
                results[i] = self(msg)
        self.done = [results[i] for i in range(len(batch))]
        return self.done

    @property
    def culprit(self) -> Message | None:
        """The message the running call is about; None in a handler_batch call of several (no one to blame)."""
        return self.calling[0] if len(self.calling) == 1 else None

    @property
    def call_name(self) -> str:
        """The running (or last) call, as logs and error records name it."""
        n = len(self.calling)
        return f"message {self.calling[0].id}" if n == 1 else f"a handler_batch call of {n} messages"

    def abandon(self, reason: str) -> list[Result]:
        """What to send when the worker must die in the middle of a frame (see the watchdog).

        The results made so far, plus error records for the QoS 0 messages the worker will not get to
        (nobody retries those: at most once). QoS 1 ones are left to ingress, which dispatches them again.
        """
        out = list(self.done)
        running, where = self.calling, self.call_name
        for msg in self.batch[len(out):]:
            if msg.qos == 0:
                if any(msg is m for m in running):
                    out.append(self.error(msg, "timeout", reason if len(running) == 1 else f"{reason} ({where})", 0.0))
                else:
                    out.append(self.error(msg, "not_processed", f"worker restarted after {reason} on {where}", 0.0))
        return out

    def __call__(self, msg: Message) -> Result:
        event, refused = self._event(msg)
        if refused is not None:
            return refused
        if self.model.handler is None:  # a model with only handler_batch: a batch of one
            return self._call_batch([msg], [event])[0]
        ctx = self._context((msg,))
        ctx.batch = []
        ctx.state = self._state_in(msg)
        t0 = self.call_started = time.monotonic()
        try:
            value = self.model.handler(event, ctx)
            state = ctx.state  # changed in place, or replaced by another dict
        except (Exception, SystemExit) as e:  # SystemExit: a model calling sys.exit() costs one message only
            return self.error(msg, "model_error", e, time.monotonic() - t0)
        finally:
            self.call_started = 0.0
            ctx.state = None
        return self._result(msg, value, time.monotonic() - t0, state)

    def _call_batch(self, msgs: list[Message], events: list[Any]) -> list[Result]:
        """One handler_batch call; when it fails, every message of it gets the error record."""
        ctx = self._context(tuple(msgs))
        ctx.batch = [Meta(m.topic, m.received_at, m.id, m.attempt, m.key, self._state_in(m)) for m in msgs]
        if len(msgs) == 1:
            ctx.state = ctx.batch[0].state
        t0 = self.call_started = time.monotonic()
        try:
            values = check_batch(self.model.handler_batch(events, ctx), len(events))  # type: ignore[misc]
            if len(msgs) == 1 and ctx.state is not ctx.batch[0].state:  # a batch of one: context.state replaced
                ctx.batch[0] = replace(ctx.batch[0], state=ctx.state)
        except (Exception, SystemExit) as e:
            took = (time.monotonic() - t0) / len(msgs)
            return [self.error(m, "model_error", e, took) for m in msgs]
        finally:
            self.call_started = 0.0
            ctx.state = None
        took = (time.monotonic() - t0) / len(msgs)  # each message's share of the call
        return [self._result(m, v, took, meta.state) for m, v, meta in zip(msgs, values, ctx.batch, strict=True)]

    def _context(self, msgs: tuple[Message, ...]) -> Context:
        """The context of a call about `msgs` (now `calling`): the message's topic and ids for a call about one,
        none for a handler_batch call of several (its `batch` says which is which)."""
        ctx, self.calling = self.context, msgs
        one = msgs[0] if len(msgs) == 1 else None
        ctx.topic, ctx.received_at, ctx.message_id, ctx.attempt, ctx.key = (
            (one.topic, one.received_at, one.id, one.attempt, one.key) if one else (None, None, None, 1, None))
        return ctx

    def _state_in(self, msg: Message) -> dict[str, Any] | None:
        """The state a call about `msg` sees: its key's committed state (a fresh dict), None for an unkeyed rule."""
        if msg.key is None:
            return None
        try:
            return store.decode(msg.state)
        except (ValueError, TypeError, msgpack.UnpackException) as e:  # ingress read a row that is not ours
            self.log.warning("state of key %r is unreadable (%s): the call starts from an empty state", msg.key, e)
            return {}

    def _state_out(self, msg: Message, state: dict[str, Any] | None) -> tuple[bytes | None, str, str]:
        """After a call about `msg`: (the key's new state, None when unchanged; and, when it cannot be kept, the
        error record's reason and why)."""
        if msg.key is None or state is None:
            return None, "", ""
        if not isinstance(state, dict):
            return None, "unserialisable_state", f"context.state must stay a dict (got {type(state).__name__})"
        try:
            new = store.encode(state)
        except (TypeError, ValueError, OverflowError) as e:
            return None, "unserialisable_state", f"context.state cannot be stored: {e}"
        if new == msg.state or (not state and not msg.state):
            return None, "", ""
        limit = self.rule.state.max_bytes
        if len(new) > limit:
            return None, "state_too_large", f"context.state is {len(new)} bytes encoded, over state.max_bytes ({limit})"
        return new, "", ""

    def _event(self, msg: Message) -> tuple[Any, Result | None]:
        """The decoded event, or the result that answers the message without a call (bad payload, filtered)."""
        try:
            event = codec.decode_event(msg.payload)
        except codec.BadPayload as e:
            return None, self.error(msg, "bad_payload", e, 0.0)
        if self.rule.filter is not None and not matches(self.rule.filter, event):
            self.filtered += 1
            return None, result_for(msg, frames.NOTHING, "", b"", 0.0)
        return event, None

    def _result(self, msg: Message, value: Any, took: float, state: dict[str, Any] | None = None) -> Result:
        """The result of a call that returned `value` and left the key's state `state`."""
        new, reason, why = self._state_out(msg, state)
        if reason:
            return self.error(msg, reason, why, took)
        if value is None or (isinstance(value, str) and value in self.rule.skip_results):
            return result_for(msg, frames.NOTHING, "", b"", took)._replace(state=new)
        try:
            payload = codec.encode_value(value)
            topic = self.render(msg.topic)
        except (codec.Unserialisable, IndexError) as e:
            return self.error(msg, "unserialisable_result", e, took)
        return result_for(msg, frames.PUBLISH, topic, payload, took)._replace(state=new)

    def error(self, msg: Message, reason: str, err: BaseException | str, took: float) -> Result:
        self.log.warning("%s: %s", reason, err, extra={"message_id": msg.id})
        return frames.error_result(msg, self.error_topic(msg.topic), reason, err, took)
