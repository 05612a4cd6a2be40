"""When ingress reads MQTT: at once when input is light, in spaced reads when it is fast or workers lag.

Reading each message the moment it comes costs, per message, a wake-up of ingress, a ZMQ frame, a pass of
the worker (and its CREDIT frame back) and a write of egress: at 18,000 msg/s on 2 cores that alone filled
the box. Spacing the reads by a millisecond lets one read take a dozen messages, and every stage after it
then works on frames of that many (measured at 18,000 msg/s: ingress + worker + egress went from 84-92 % of
a core to 37-40 %).

- Light input (under FAST_RATE msg/s over the last RATE_WINDOW): every message is read as it comes, so the
  latency at a few thousand msg/s stays well under a millisecond.
- Fast input: reads at most every FAST_READ_EVERY (adds up to that to a message's latency).
- A backlog waiting for worker credit (the workers are the bottleneck): reads at most every BUSY_READ_EVERY,
  so ingress wakes up for credit rather than for each message, which leaves the busy workers more CPU.

Spaced reads rely on the broker sending what it holds as soon as it may: see `fastpaho.FastClient._quickack` for
the delayed-ACK stall they would otherwise meet (TCP_QUICKACK).
"""

from __future__ import annotations

FAST_RATE = 4000  # messages per second above which reads are spaced
RATE_WINDOW = 0.02  # seconds over which the input rate is measured
FAST_READ_EVERY = 0.001  # seconds between reads while input is fast
BUSY_READ_EVERY = 0.002  # seconds between reads while a backlog waits for worker credit
IDLE_POLL_MS = 50  # poll timeout while reading (the loop also wakes up for ZMQ input)


class ReadPace:
    """`step` after each pass of ingress's loop says whether MQTT input is read now; `timeout_ms` is how long
    the next poll may wait."""

    def __init__(self) -> None:
        self.reading = True
        self.fast = False  # input came faster than FAST_RATE over the last window
        self.resume_at = 0.0
        self._window_end = 0.0
        self._received_at_window = 0

    def step(self, now: float, received: int, backlog: bool) -> bool:
        """`received`: messages taken so far (a running count); `backlog`: messages wait for worker credit."""
        if now >= self._window_end:
            self.fast = received - self._received_at_window >= FAST_RATE * RATE_WINDOW
            self._received_at_window, self._window_end = received, now + RATE_WINDOW
        if self.reading and (backlog or self.fast):
            self.reading, self.resume_at = False, now + (BUSY_READ_EVERY if backlog else FAST_READ_EVERY)
        elif not self.reading and now >= self.resume_at:
            self.reading = True
        return self.reading

    def timeout_ms(self, now: float) -> int:
        return IDLE_POLL_MS if self.reading else int(max(0.0, self.resume_at - now) * 1000) + 1
