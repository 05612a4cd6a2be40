"""Calibrates raw readings with a pickled Calibration loaded once per worker in init()."""

import os
import pickle

CAL = None


def init(context):
    global CAL
    with open(os.path.join(os.path.dirname(__file__), "calibration.pkl"), "rb") as f:
        CAL = pickle.load(f)  # its class lives in calibration.py next to this file
    context.logger.info("calibration loaded for %d devices", len(CAL.gains))


def handler(event, context):
    device = event.get("deviceName", "")
    return {"deviceName": device, "raw": event["value"], "value": round(CAL.apply(device, event["value"]), 3)}
