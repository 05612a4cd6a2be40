"""Benchmark model: echoes the sequence number and send time so a receiver can measure loss and latency.

Accepts both load generator shapes: flat ({"seq", "ts", "deviceName", ...}) and pyboot
({"deviceInfo": {"deviceName", ...}, "telemetry": {...}, "seq", "ts"}).
`params: {burn_ms: N}` makes each call burn N ms of CPU first (a CPU-heavy model for scaling runs).
"""

import time


def init(context):
    context.extra["burn"] = float(context.params.get("burn_ms") or 0) / 1000.0


def handler(event, context):
    burn = context.extra.get("burn", 0.0)
    if burn:
        until = time.thread_time() + burn  # CPU time, so a shared core does not shorten the burn
        while time.thread_time() < until:
            pass
    device = event.get("deviceName")
    if device is None:
        device = (event.get("deviceInfo") or {}).get("deviceName")
    return {"seq": event["seq"], "ts": event["ts"], "deviceName": device}
