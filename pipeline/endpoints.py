"""Every ZeroMQ address of a stack, spelled once.

Stable stages bind, workers connect:
    ingress  binds ROUTER rule(i)  <-> workers of rule i connect DEALER (frames out, credit back)
    ingress  binds PULL  beats     <- every worker's watchdog thread connects PUSH (liveness, timeouts)
    ingress  binds PULL  confirms  <- egress connects PUSH (results that are safe: ack upstream)
    egress   binds PULL  results   <- every worker (and ingress, for dead letters) connects PUSH
    control  binds SUB   stats     <- every stage connects PUB (periodic snapshots, never per message)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import StartupError

if TYPE_CHECKING:  # pipeline.config loads pydantic; a stage gets its config from pipeline.frozen
    from pipeline.config import Config

_IPC_MAX = 100  # sun_path is 108 bytes on Linux, 104 on macOS


@dataclass(frozen=True)
class Endpoints:
    transport: str  # "ipc" | "tcp"
    run_dir: Path
    host: str = "127.0.0.1"
    base_port: int = 5800

    @classmethod
    def for_config(cls, cfg: Config, run_dir: Path) -> Endpoints:
        e = cfg.endpoints
        return cls(e.transport, run_dir, e.host, e.base_port)

    def _addr(self, name: str, offset: int) -> str:
        if self.transport == "tcp":
            return f"tcp://{self.host}:{self.base_port + offset}"
        path = self.run_dir / f"{name}.sock"
        if len(str(path)) > _IPC_MAX:
            raise StartupError(
                f"ipc socket path too long ({len(str(path))} > {_IPC_MAX} bytes): {path}; "
                "use a shorter --run-dir"
            )
        return f"ipc://{path}"

    def results(self) -> str:
        return self._addr("results", 0)

    def stats(self) -> str:
        return self._addr("stats", 1)

    def beats(self) -> str:
        return self._addr("beats", 2)

    def confirms(self) -> str:
        return self._addr("confirms", 3)

    def rule(self, index: int) -> str:
        return self._addr(f"rule-{index}", 10 + index)
