"""Test model for record/replay, the version to try: as level_v1, plus a "level" field above 80 (the only
messages whose output changes); a value of -1 hangs the call (the rule's timeout stops it)."""

import time


def handler(event, context):
    value = event["value"]
    if value == -1:
        time.sleep(60)
    out = {"device": event.get("device"), "value": value, "alarm": value > context.params.get("limit", 50)}
    if value > 80:
        out["level"] = "high"
    return out
