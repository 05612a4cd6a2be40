"""Workers: a pool per rule; each process loads the model once and calls it for every message."""

from pipeline.stages.worker.stage import run

__all__ = ["run"]
