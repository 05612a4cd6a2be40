"""Test model for shadows and canaries (tests/test_trials.py): answers {"seq", "value"} with value = 2 * seq, so two
versions agree unless params make them differ: `differ_every: N` adds 1 to the value of every seq divisible by N,
`fail_every: N` raises on every seq divisible by N."""


def handler(event, context):
    seq = event["seq"]
    fail_every, differ_every = context.params.get("fail_every"), context.params.get("differ_every")
    if fail_every and seq % fail_every == 0:
        raise ValueError(f"asked to fail on every {fail_every}th message (seq {seq})")
    value = 2 * seq + (1 if differ_every and seq % differ_every == 0 else 0)
    return {"seq": seq, "value": value}
