"""Test model that only vectorises: handler_batch(events, context), behaviour chosen by the events."""

import time

import numpy as np


def handler_batch(events, context):
    if any(e.get("fail") for e in events):
        raise ValueError(f"asked to fail in a batch of {len(events)}")
    if any(e.get("short") for e in events):
        return [{"only": "one"}]
    slow = max((e.get("sleep", 0) for e in events), default=0)  # one slow event holds up the whole call
    if slow:
        time.sleep(slow)
    doubled = np.array([e.get("value", 0) for e in events], dtype=float) * 2  # one numpy call for the batch
    return [
        {"seq": e.get("seq"), "value": v, "batch": len(events), "topic": m.topic, "message_id": m.message_id,
         "attempt": m.attempt, "alone_topic": context.topic}
        for e, v, m in zip(events, doubled, context.batch, strict=True)
    ]
