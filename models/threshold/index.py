"""Threshold alarm: flags a reading whose value passes context.params['limit']."""


def handler(event, context):
    limit = context.params.get("limit", 30)
    value = event["value"]
    return {"deviceName": event.get("deviceName"), "value": value, "alarm": value > limit, "limit": limit}
