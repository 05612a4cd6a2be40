"""Test model for per-key order (tests/faults/test_keyed_faults.py): 0-2 ms in the model at random, so that
messages of one device handled by different workers would overtake each other; returns the device, its sequence
number and the key value the runtime gave."""

import random
import time


def handler(event, context):
    time.sleep(random.uniform(0.0, 0.002))
    return {"device": event["device"], "seq": event["seq"], "key": context.key}
