"""Test model whose behaviour is chosen by the event: echo, fail, skip, bytes, unserialisable, sleep, exit, pad."""

import math
import os
import sys
import time


def handler(event, context):
    if event.get("fail"):
        raise ValueError(f"asked to fail on {event.get('seq')}")
    if event.get("skip"):
        return None
    if event.get("bytes"):
        return b"\x00raw\xff"
    if event.get("unserialisable"):
        return {"obj": object()}
    if "pad" in event:
        return {"seq": event.get("seq"), "pad": "x" * event["pad"]}
    if event.get("nan"):
        return {"nan": math.nan, "inf": math.inf, "text": "température"}
    if "sleep" in event:
        time.sleep(event["sleep"])
    if event.get("exit"):
        sys.exit(3)
    if context.attempt <= event.get("crash_on_attempt", 0):
        os._exit(1)  # the whole worker dies, as a segfault would
    return {
        "seq": event.get("seq"),
        "tag": context.params.get("tag"),
        "topic": context.topic,
        "rule": context.rule,
        "model": context.model,
        "message_id": context.message_id,
        "pid": os.getpid(),
        "received_at": context.received_at,
    }
