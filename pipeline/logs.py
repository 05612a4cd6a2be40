"""One log line per event, with the stage, rule and message id on every line."""

from __future__ import annotations

import logging
import os
import sys

FORMAT = "%(asctime)s %(levelname)s %(stage)s rule=%(rule)s msg=%(message_id)s %(name)s: %(message)s"


class _Fields(logging.Filter):
    """Puts the stage, rule and message id on every record."""

    def __init__(self, stage: str, rule: str | None) -> None:
        super().__init__()
        self.stage, self.rule = stage, rule or "-"

    def filter(self, record: logging.LogRecord) -> bool:
        record.stage = self.stage
        record.rule = getattr(record, "rule", self.rule)
        record.message_id = getattr(record, "message_id", "-")
        return True


def setup(stage: str, rule: str | None = None, level: str | None = None) -> None:
    """Configure the root logger of a stage process (stderr; supervisord collects it). A process forked from one
    that set it up (the fork server's workers) keeps that handler and only names its own stage and rule: objects
    made anew would be pages of its own, where the inherited ones are shared."""
    root = logging.getLogger()
    fields = [f for h in root.handlers for f in h.filters if isinstance(f, _Fields)]
    if len(root.handlers) == 1 and len(fields) == 1 and root.handlers[0].stream is sys.stderr:
        fields[0].stage, fields[0].rule = stage, rule or "-"
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.addFilter(_Fields(stage, rule))
        handler.setFormatter(logging.Formatter(FORMAT))
        root.handlers[:] = [handler]
    wanted = (level or os.environ.get("PIPELINE_LOG_LEVEL") or "INFO").upper()
    if logging.getLevelName(root.level) != wanted:  # setLevel clears the cache of every logger
        root.setLevel(wanted)
