"""Releasing PUBACKs in the order the PUBLISH packets arrived (MQTT 3.1.1 and 5, section 4.6).

Workers finish out of order; an ack waits until every earlier QoS 1 message of the same connection is
done. A message that feeds several rules is done when every one of those rules confirmed its result.
"""

from __future__ import annotations

from collections import deque

from pipeline.wire.fastpaho import FastClient


class AckWindow:
    """The PUBACKs of one MQTT connection, released in arrival order once every rule of each message
    confirmed it. Owns the window of open QoS 1 messages; `acked` counts what was released."""

    def __init__(self, client: FastClient) -> None:
        self.client = client
        self._order: deque[list] = deque()  # [mid, rules still to confirm], in arrival order
        self._open: dict[str, list] = {}  # message id -> its entry
        self.acked = 0

    def add(self, msg_id: str, mid: int, rules: set[str]) -> None:
        entry = [mid, rules]
        self._order.append(entry)
        if rules:
            self._open[msg_id] = entry
        else:
            self._release()

    def done(self, msg_id: str, rule: str) -> None:
        entry = self._open.get(msg_id)
        if entry is None:
            return  # a duplicate confirm, or a message of an earlier session
        entry[1].discard(rule)
        if not entry[1]:
            del self._open[msg_id]
            self._release()

    def _release(self) -> None:
        order = self._order
        while order and not order[0][1]:
            self.client.puback(order.popleft()[0])
            self.acked += 1

    def reset(self) -> None:
        """A new session: the broker sends again whatever was not acked; forget the old packet ids."""
        self._order.clear()
        self._open.clear()

    def __len__(self) -> int:
        return len(self._order)
