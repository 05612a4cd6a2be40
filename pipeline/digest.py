"""sha256 and sha1 without loading OpenSSL.

Importing `hashlib` loads OpenSSL's libcrypto (about 3.5 MiB of RSS in every process that does). The stages
hash only a few small things at start (the config file, a model's files), which CPython's built-in
implementations do as well, with the same digests: this module uses those (`_sha256`/`_sha1` in CPython 3.11,
`_sha2`/`_sha1` from 3.12) and falls back to hashlib on a Python built without them.
"""

from __future__ import annotations

from typing import Any


def sha256(data: bytes = b"") -> Any:
    """A sha256 hash object (update/hexdigest), as hashlib.sha256(data)."""
    try:
        from _sha2 import sha256 as impl  # CPython 3.12+
    except ImportError:
        try:
            from _sha256 import sha256 as impl  # CPython 3.11
        except ImportError:
            from hashlib import sha256 as impl
    return impl(data)


def sha1(data: bytes = b"") -> Any:
    """A sha1 hash object, as hashlib.sha1(data)."""
    try:
        from _sha1 import sha1 as impl
    except ImportError:
        from hashlib import sha1 as impl
    return impl(data)
