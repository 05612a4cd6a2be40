"""ZMQ CURVE keys for workers on other boxes: key files, the handler that lets authorized workers in, and
`pipeline keys`.

Key files are ZeroMQ's own certificate format (`zmq.auth`): `<name>.key` holds the public key and may be
copied anywhere; `<name>.key_secret` holds both and stays on its box (written mode 0600).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from pipeline.errors import CONFIG_ERROR, OK, ConfigError

log = logging.getLogger("pipeline.curve")  # a stable name for log filters, not the module path


@dataclass(frozen=True)
class Curve:
    """CURVE keys (z85) of one side. A server names the folder of the clients it lets in; a client names the
    public key of the server it talks to."""

    public: bytes
    secret: bytes
    server: bytes | None = None  # client side: the server's public key
    authorized: Path | None = None  # server side: folder of <name>.key files, read at each handshake


def read_keys(path: Path, source: object, key: str = "", secret: bool = True) -> tuple[bytes, bytes]:
    """(public, secret) from a key file written by `pipeline keys` (secret b"" when `secret` is False);
    a ConfigError naming `source`, `key` and the file otherwise."""
    import zmq.auth  # here and below, not at the top: a stack without remote workers never loads it

    at = f"{key}: " if key else ""
    try:
        public, private = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise ConfigError(source, [f"{at}cannot read key file {path}: {e}"]) from None
    if secret and not private:
        raise ConfigError(source, [f"{at}{path} holds no secret key (give the .key_secret file)"])
    return public, private or b""


class Authorized:
    """A ZAP handler: CURVE clients whose public key is in `folder` (any `*.key` file) get in, others do not."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.auth: Any = None  # zmq.auth.thread.ThreadAuthenticator, imported when used (it loads asyncio)

    def start(self, ctx: zmq.Context) -> Authorized:
        from zmq.auth.thread import ThreadAuthenticator

        self.auth = ThreadAuthenticator(ctx, log=log)
        self.auth.start()
        self.auth.configure_curve_callback("*", credentials_provider=self)
        return self

    def callback(self, _domain: str, key: bytes) -> bool:
        """Called by the handler's thread at each CURVE handshake with the client's z85 public key."""
        allowed = key in self.keys()
        if not allowed:
            log.warning("refused a remote worker with key %s: not in %s", key.decode(), self.folder)
        return allowed

    def keys(self) -> set[bytes]:
        import zmq.auth

        out = set()
        for path in sorted(self.folder.glob("*.key")):
            try:
                out.add(zmq.auth.load_certificate(path)[0])
            except (OSError, ValueError) as e:
                log.warning("authorized key %s unreadable, ignored: %s", path, e)
        return out

    def stop(self) -> None:
        if self.auth is not None:
            self.auth.stop()


def cmd_keys(args: argparse.Namespace) -> int:
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    public, secret = folder / f"{args.name}.key", folder / f"{args.name}.key_secret"
    for path in (public, secret):
        if path.exists():
            print(f"pipeline keys: {path} exists; not overwritten (remove it first)", file=sys.stderr)
            return CONFIG_ERROR
    import zmq.auth

    old = os.umask(0o077)  # the secret file is never readable by others, not even for a moment
    try:
        zmq.auth.create_certificates(folder, args.name)
    finally:
        os.umask(old)
    public.chmod(0o644)
    print(f"wrote {public} (public: copy it to the other side) and {secret} (secret, mode 0600: keep it here)\n"
          f"  a stack:  endpoints.remote.server_key: {secret}; its workers get {public.name} as --server-key\n"
          f"  a worker: --key {secret}; put {public.name} into the stack's endpoints.remote.authorized_keys folder")
    return OK


def add_commands(sub: Any) -> None:
    sp = sub.add_parser("keys", help="make a ZMQ CURVE key pair for remote workers",
                        description="Write NAME.key (public) and NAME.key_secret (mode 0600) into --dir.")
    sp.add_argument("name", help="file name of the pair, e.g. 'stack' or the worker box's host name")
    sp.add_argument("--dir", default=".", help="folder to write into (default: the current one)")
    sp.set_defaults(func=cmd_keys)
