"""Ingress: MQTT subscriptions of every rule -> msgpack frames on each rule's ZMQ PUSH socket."""

from pipeline.stages.ingress.stage import run

__all__ = ["run"]
