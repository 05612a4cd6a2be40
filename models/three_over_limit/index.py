"""Three in a row: flags a device whose readings pass context.params['limit'] (default 30) three times running.

Run it in a keyed rule (`key: deviceName`, or the topic level that names the device): `context.state` is then
this device's state, and its readings come one at a time, in order. The state holds the length of the current
run of readings over the limit (`state["over"]`); a reading at or under the limit ends the run and empties the
state, so a device that stays under the limit never has its state written.

Every reading gets a result: {"deviceName", "value", "limit", "over": run length, "alarm"}. `alarm` is True from
the third consecutive reading over the limit on, for every reading while the run lasts (so a subscriber sees the
device is still over; the first alarm of a run is the one with "over": 3), and False otherwise.
"""

RUN = 3


def handler(event, context):
    if context.state is None:
        raise ValueError("three_over_limit keeps a run per device: give its rule a key (e.g. key: deviceName)")
    limit = context.params.get("limit", 30)
    value = event["value"]
    if value > limit:
        context.state["over"] = over = context.state.get("over", 0) + 1
    else:
        context.state.pop("over", None)
        over = 0
    return {"deviceName": event.get("deviceName"), "value": value, "limit": limit, "over": over,
            "alarm": over >= RUN}
