"""A model built like the old runtime's: flat index.py, model files found by listing its own folder, a
pickled object whose class lives in a helper package shipped next to it (imported absolutely)."""

import os
import pickle

from helpers.scaler import Scaler

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = {}
for entry in sorted(os.listdir(HERE)):
    if entry.endswith(".pkl"):
        with open(os.path.join(HERE, entry), "rb") as f:
            MODELS[entry[:-4]] = pickle.load(f)


def handler(event, context):
    scaler = MODELS["scaler"]
    assert isinstance(scaler, Scaler)
    device = event["deviceInfo"]["deviceName"]
    return {"deviceName": device, "temp": scaler.apply(event["telemetry"]["temp"]), "models": sorted(MODELS)}
