"""Test model: init() unpickles an object whose class lives in a helper module, reads a file next to __file__."""

import os
import pickle

from helper_scaler import Scaler  # helper module next to index.py, imported absolutely

from . import helper_scaler as relative  # and relatively: the folder is importable as a package

STATE = {}


def init(context):
    here = os.path.dirname(__file__)
    with open(os.path.join(here, "scaler.pkl"), "rb") as f:
        STATE["scaler"] = pickle.load(f)
    with open(os.path.join(here, "units.txt")) as f:
        STATE["unit"] = f.read().strip()
    STATE["inits"] = STATE.get("inits", 0) + 1
    assert isinstance(STATE["scaler"], Scaler) and relative.Scaler is Scaler


def handler(event, context):
    return {"value": STATE["scaler"].apply(event["value"]), "unit": STATE["unit"], "inits": STATE["inits"]}
