"""Test model for per-key state (tests/faults/test_keyed_faults.py): counts its key's messages in context.state;
each result carries the count, so the counts published for a device must be exactly 1..N."""


def handler(event, context):
    context.state["n"] = context.state.get("n", 0) + 1
    return {"device": event["device"], "seq": event["seq"], "count": context.state["n"]}
