"""Workers: processes that call a model for every message of a rule (a pool process: of each shared rule of its model);
each loads the model once."""

from pipeline.stages.worker.stage import run

__all__ = ["run"]
