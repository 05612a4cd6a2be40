"""Every ZeroMQ address of a stack, spelled once, and the sockets made on them.

Stable stages bind, workers connect:
    ingress  binds ROUTER rule(i)  <-> workers of rule i connect DEALER (frames out, credit back)
    ingress  binds PULL  beats     <- every worker's watchdog thread connects PUSH (liveness, timeouts)
    ingress  binds PULL  confirms  <- egress connects PUSH (results that are safe: ack upstream)
    egress   binds PULL  results   <- every worker (and ingress, for dead letters) connects PUSH
    control  binds SUB   stats     <- every stage connects PUB (periodic snapshots, never per message)

A stack with `endpoints.remote` also binds the sockets a worker uses (REMOTE: rule(i), beats, results, stats)
on tcp://<remote.listen>:<remote.base_port + offset>, as ZMQ CURVE servers: traffic is encrypted, and only
workers whose public key lies in `remote.authorized_keys` get in (checked by a ZAP handler, see `guard`).
The stack's own stages keep using the local addresses, without CURVE. A worker on another box
(`pipeline worker --connect HOST`) is given `Endpoints.remote_worker(...)`: the same names, on HOST, as a
CURVE client.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq

from pipeline.errors import ConfigError, StartupError
from pipeline.wire.curve import Authorized, Curve, read_keys

if TYPE_CHECKING:  # pipeline.config.load loads pydantic; a stage gets its config from pipeline.config.snapshot
    from pipeline.config.load import Config

_IPC_MAX = 100  # sun_path is 108 bytes on Linux, 104 on macOS
_OFFSET = {"results": 0, "stats": 1, "beats": 2, "confirms": 3, "rule": 10}  # rule i: 10 + i
REMOTE = frozenset({"rule", "beats", "results", "stats"})  # what a worker connects to
REMOTE_BASE_PORT = 5900


@dataclass(frozen=True)
class Endpoints:
    """The ZeroMQ addresses of one stack and how to open sockets on them. Immutable; `for_config` gives a
    stack's own, `remote_worker` a worker's on another box (CURVE client)."""

    transport: str  # "ipc" | "tcp"
    run_dir: Path
    host: str = "127.0.0.1"
    base_port: int = 5800
    remote_host: str | None = None  # stack side: also bind REMOTE sockets here for workers on other boxes
    remote_port: int = REMOTE_BASE_PORT
    curve: Curve | None = None

    @classmethod
    def for_config(cls, cfg: Config, run_dir: Path) -> Endpoints:
        e, r = cfg.endpoints, cfg.endpoints.remote
        if r is None:
            return cls(e.transport, run_dir, e.host, e.base_port)
        public, secret = read_keys(r.server_key, cfg.source, "endpoints.remote.server_key")
        if not r.authorized_keys.is_dir():
            raise ConfigError(cfg.source, [f"endpoints.remote.authorized_keys: not a folder: {r.authorized_keys}"])
        return cls(e.transport, run_dir, e.host, e.base_port, r.listen, r.base_port,
                   Curve(public, secret, authorized=r.authorized_keys))

    @classmethod
    def remote_worker(cls, cfg: Config, run_dir: Path, connect: str, key: Path, server_key: Path) -> Endpoints:
        """A worker on another box: the stack's REMOTE sockets on `connect` (HOST or HOST:BASE_PORT)."""
        host, _, port = connect.rpartition(":") if ":" in connect else (connect, "", "")
        remote = cfg.endpoints.remote
        base = int(port) if port.isdigit() else (remote.base_port if remote else REMOTE_BASE_PORT)
        public, secret = read_keys(key, "--key")
        server, _ = read_keys(server_key, "--server-key", secret=False)
        return cls("tcp", run_dir, host, base, curve=Curve(public, secret, server=server))

    def address(self, name: str, index: int | None = None, remote: bool = False) -> str:
        offset = _OFFSET[name] + (index or 0)
        if remote:
            return f"tcp://{self.remote_host}:{self.remote_port + offset}"
        if self.transport == "tcp":
            return f"tcp://{self.host}:{self.base_port + offset}"
        path = self.run_dir / (f"{name}-{index}.sock" if index is not None else f"{name}.sock")
        if len(str(path)) > _IPC_MAX:
            raise StartupError(
                f"ipc socket path too long ({len(str(path))} > {_IPC_MAX} bytes): {path}; "
                "use a shorter --run-dir"
            )
        return f"ipc://{path}"

    def bind(self, ctx: zmq.Context, kind: int, name: str, index: int | None = None) -> zmq.Socket:
        """A socket of `kind` bound to the address `name`; for a stack open to remote workers, a REMOTE one is
        bound a second time on tcp as a CURVE server (options are taken per bind: the local one stays plain)."""
        s = ctx.socket(kind)
        if kind == zmq.ROUTER:
            s.setsockopt(zmq.ROUTER_MANDATORY, 1)  # refuse to drop frames for unknown peers
        try:
            s.bind(self.address(name, index))
            if self.remote_host is not None and self.curve is not None and name in REMOTE:
                s.curve_server = True
                s.curve_publickey, s.curve_secretkey = self.curve.public, self.curve.secret
                s.bind(self.address(name, index, remote=True))
        except zmq.ZMQError as e:
            s.close(linger=0)
            raise StartupError(f"cannot bind the {name} socket: {e}") from None
        return s

    def connect(self, ctx: zmq.Context, kind: int, name: str, index: int | None = None,
                options: dict[int, Any] | None = None) -> zmq.Socket:
        """A socket of `kind` connected to `name`, with `options` set first; a CURVE client on a remote worker."""
        s = ctx.socket(kind)
        for option, value in (options or {}).items():
            s.setsockopt(option, value)
        if self.curve is not None and self.curve.server is not None:
            s.curve_serverkey = self.curve.server
            s.curve_publickey, s.curve_secretkey = self.curve.public, self.curve.secret
        s.connect(self.address(name, index))
        return s

    def guard(self, ctx: zmq.Context) -> Authorized | None:
        """For a stack open to remote workers: a started ZAP handler of `ctx` that lets in the CURVE clients
        whose public key is in `authorized_keys` (read at each handshake: adding a key needs no restart).
        Stop it after closing the sockets. None otherwise."""
        if self.remote_host is None or self.curve is None or self.curve.authorized is None:
            return None
        return Authorized(self.curve.authorized).start(ctx)
