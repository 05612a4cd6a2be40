"""Benchmark model: echoes the sequence number and send time so a receiver can measure loss and latency.

Accepts both load generator shapes: flat ({"seq", "ts", "deviceName", ...}) and pyboot
({"deviceInfo": {"deviceName", ...}, "telemetry": {...}, "seq", "ts"}).
`params: {burn_ms: N}` makes each call burn N ms of CPU first (a CPU-heavy model for scaling runs).
"""

import time


def init(context):
    context.extra["burn"] = float(context.params.get("burn_ms") or 0) / 1000.0


def _burn(seconds):
    """Spend `seconds` of this thread's CPU time (so a shared core does not shorten the burn), in user space as
    a model's arithmetic would: the clock is read every ~10 us of work, not in a tight loop. Reading
    CLOCK_THREAD_CPUTIME_ID is a system call, and a loop doing nothing else spent ~75 % of its time in the
    kernel, which is not what a CPU-heavy model does (and scaled worse across cores than user code)."""
    until = time.thread_time() + seconds
    while time.thread_time() < until:
        for _ in range(250):
            pass


def handler(event, context):
    burn = context.extra.get("burn", 0.0)
    if burn:
        _burn(burn)
    device = event.get("deviceName")
    if device is None:
        device = (event.get("deviceInfo") or {}).get("deviceName")
    return {"seq": event["seq"], "ts": event["ts"], "deviceName": device}
