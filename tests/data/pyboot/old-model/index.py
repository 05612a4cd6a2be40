"""A model built like the old runtime's: a flat index.py with handler(event, content), its model files found by
listing its own folder (`*.model`, pickles of a class that lives in a helper package shipped beside it)."""

import os
import pickle

from helpers.scaler import Scaler

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = {}
for entry in sorted(os.listdir(HERE)):
    if entry.endswith(".model"):
        with open(os.path.join(HERE, entry), "rb") as f:
            MODELS[entry[: -len(".model")]] = pickle.load(f)


def handler(event, content):
    telemetry = event["telemetry"]
    mode = telemetry.get("mode")
    if mode == "fail":
        raise ValueError("reading out of range")
    if mode in ("{}", "null"):
        return mode  # the old runtime's way of saying "nothing to publish"
    if mode == "none":
        return None
    scaler = MODELS["scaler"]
    assert isinstance(scaler, Scaler)
    points = {k: scaler.apply(v) for k, v in telemetry.items() if k != "ts" and isinstance(v, (int, float))}
    return {"deviceName": event["deviceInfo"]["deviceName"], "ts": telemetry["ts"], "points": points,
            "models": sorted(MODELS)}
