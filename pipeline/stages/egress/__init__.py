"""Egress: PULL results from every worker, publish them to MQTT."""

from pipeline.stages.egress.stage import run

__all__ = ["run"]
