"""Test model for shadows and canaries (tests/test_trials.py): answers {"seq", "value"} with value = 2 * seq, so two
versions agree unless params make them differ: `differ_every: N` adds 1 to the value of every seq divisible by N,
`fail_every: N` raises on every seq divisible by N, `sleep: S` sleeps S seconds per call, `tag: T` adds "tag": T."""

import time


def handler(event, context):
    seq, params = event["seq"], context.params
    if params.get("sleep"):
        time.sleep(params["sleep"])
    if params.get("fail_every") and seq % params["fail_every"] == 0:
        raise ValueError(f"asked to fail on every {params['fail_every']}th message (seq {seq})")
    differs = bool(params.get("differ_every")) and seq % params["differ_every"] == 0
    out = {"seq": seq, "value": 2 * seq + differs}
    if "tag" in params:
        out["tag"] = params["tag"]
    return out
