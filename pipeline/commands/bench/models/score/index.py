"""Benchmark model that scores each reading with numpy (standardise, a linear layer, a sigmoid), per message
through `handler` or per frame through `handler_batch`, and echoes `seq` and `ts` like the echo model.

`BENCH_SCORE_BATCH=0` in the environment of `pipeline bench` leaves `handler_batch` out (the per-message
comparison run): `BENCH_MODEL=score pipeline bench -c conf/bench.yaml ...`.
"""

import os

import numpy as np

_RNG = np.random.default_rng(7)
MEAN, SCALE = np.full(8, 25.0), np.full(8, 5.0)
WEIGHTS, BIAS = _RNG.normal(size=(8, 4)), _RNG.normal(size=4)


def _features(event):
    value = float(event.get("value", 0.0))
    return [value, value * 0.5, value + 1.0, value - 1.0, value * 2.0, value / 3.0, value * value / 100.0, 1.0]


def _score(rows):
    z = (np.asarray(rows, dtype=float) - MEAN) / SCALE
    return 1.0 / (1.0 + np.exp(-(z @ WEIGHTS + BIAS)))


def _result(event, scores):
    return {"seq": event["seq"], "ts": event["ts"], "deviceName": event.get("deviceName"),
            "alarm": bool(scores.max() > 0.9), "score": round(float(scores.max()), 4)}


def handler(event, context):
    return _result(event, _score([_features(event)])[0])


def handler_batch(events, context):
    scores = _score([_features(e) for e in events])
    return [_result(e, s) for e, s in zip(events, scores, strict=True)]


if os.environ.get("BENCH_SCORE_BATCH") == "0":
    del handler_batch
