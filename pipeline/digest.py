"""sha256, sha1 and blake2b without loading OpenSSL.

Importing `hashlib` loads OpenSSL's libcrypto (megabytes of RSS in every process that does). The stages
hash only a few small things at start (the config file, a model's files), which CPython's built-in
implementations do as well, with the same digests: this module uses those (`_sha256`/`_sha1` in CPython 3.11,
`_sha2`/`_sha1` from 3.12, `_blake2`) and falls back to hashlib on a Python built without them. The constructors
take optional initial bytes and return a hash object (update, hexdigest), as hashlib's do. blake2b tells a
message delivered again from a new one (`pipeline.wire.frames.digest_of`), per message of a keyed rule.
"""

from __future__ import annotations

try:
    from _sha2 import sha256  # CPython 3.12+
except ImportError:
    try:
        from _sha256 import sha256  # CPython 3.11
    except ImportError:
        from hashlib import sha256
try:
    from _sha1 import sha1
except ImportError:
    from hashlib import sha1

try:
    from _blake2 import blake2b
except ImportError:
    from hashlib import blake2b

__all__ = ["blake2b", "sha1", "sha256"]
