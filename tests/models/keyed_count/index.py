"""Test model for replaying a keyed rule: counts the messages of each key in its state."""


def handler(event, context):
    context.state["n"] = n = context.state.get("n", 0) + 1
    return {"key": context.key, "n": n}
