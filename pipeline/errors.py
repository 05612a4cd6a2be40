"""Errors and exit codes.

    PipelineError                 root of everything the pipeline raises on purpose
    ├── ConfigError               the YAML file is missing, unreadable or invalid   -> exit CONFIG_ERROR
    ├── ModelLoadError            a model package cannot be found, imported or init  -> exit MODEL_LOAD_ERROR
    ├── StartupError              the environment refuses us (port taken, path long) -> exit STARTUP_ERROR
    ├── DecodeError               a ZMQ frame is not a valid envelope (a bug or a version mix)
    ├── rollout.capture.CaptureError             a capture file is not one, or is cut   -> exit CONFIG_ERROR
    ├── models.codec.BadPayload, Unserialisable   an input is not JSON / a result cannot be published
    ├── supervision.rpc.SupervisorError           supervisord refused a call or did not answer
    ├── supervision.forkctl.ForkServerError       the fork server refused a request or did not answer
    ├── supervision.reload.ReloadError, Busy      a model reload failed / another one runs
    └── commands.bench.runner.BenchError          a benchmark cannot go on

Exit codes are named so that the supervisord configuration can tell "restart me" (a crash: any other code
or a signal) from "a restart will not help" (FATAL_EXIT_CODES), and so that `pipeline up` can report why.
"""

from __future__ import annotations

OK = 0
CONFIG_ERROR = 2
MODEL_LOAD_ERROR = 3
STARTUP_ERROR = 4
WORKER_TIMEOUT = 5  # a model call passed the rule's timeout; the worker exits and is restarted
WORKER_RSS = 6  # a worker grew past the rule's max_rss; it exits after its frame and is restarted

FATAL_EXIT_CODES = (CONFIG_ERROR, MODEL_LOAD_ERROR, STARTUP_ERROR)
EXIT_CODE_NAMES = {
    CONFIG_ERROR: "CONFIG_ERROR",
    MODEL_LOAD_ERROR: "MODEL_LOAD_ERROR",
    STARTUP_ERROR: "STARTUP_ERROR",
    WORKER_TIMEOUT: "WORKER_TIMEOUT",
    WORKER_RSS: "WORKER_RSS",
}


class PipelineError(Exception):
    """Root of every error the pipeline raises on purpose; `exit_code` is what the CLI exits with when this
    reaches it."""

    exit_code = 1


class ConfigError(PipelineError):
    """The configuration file is invalid; `problems` holds one line per problem."""

    exit_code = CONFIG_ERROR

    def __init__(self, path: object, problems: list[str]) -> None:
        self.path = str(path)
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{self.path}: {len(problems)} problem(s)\n{lines}")


class ModelLoadError(PipelineError):
    """A model cannot be found, downloaded, verified, imported or initialised; the message names the model."""

    exit_code = MODEL_LOAD_ERROR


class StartupError(PipelineError):
    """The environment refuses the stack (a port taken, an unsafe run directory...); a restart will not help."""

    exit_code = STARTUP_ERROR


class DecodeError(PipelineError):
    """A frame could not be decoded into envelopes."""
