"""The model of `benchmarks/keyed.py`: echoes `seq`, `ts` and `deviceName` (what the bench's receiver measures
loss and latency from), optionally burning CPU and counting messages per key in `context.state`.

params: `burn_ms` (CPU milliseconds per call, as the bench's echo model burns them: thread CPU time, in user
space) and `count` (true: `context.state["n"]` += 1 and the result carries `n`, so every call changes the
key's state and egress commits it with the result; the script checks that each device's `n` runs 1, 2, 3...).
"""

import time


def init(context):
    context.extra["burn"] = float(context.params.get("burn_ms") or 0) / 1000.0
    context.extra["count"] = str(context.params.get("count", "")).lower() in ("1", "true", "yes")


def _burn(seconds):
    until = time.thread_time() + seconds
    while time.thread_time() < until:
        for _ in range(250):
            pass


def handler(event, context):
    burn = context.extra["burn"]
    if burn:
        _burn(burn)
    out = {"seq": event["seq"], "ts": event["ts"], "deviceName": event.get("deviceName")}
    if context.extra["count"]:
        n = context.state.get("n", 0) + 1
        context.state["n"] = n
        out["n"] = n
    return out
