"""Edge model runtime: MQTT in, Python models in worker processes, MQTT out, over ZeroMQ."""

__version__ = "0.1.0"
