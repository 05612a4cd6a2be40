"""Test model for record/replay, the version in service: an alarm above the limit (params), batched."""


def handler_batch(events, context):
    limit = context.params.get("limit", 50)
    return [{"device": e.get("device"), "value": e["value"], "alarm": e["value"] > limit} for e in events]
