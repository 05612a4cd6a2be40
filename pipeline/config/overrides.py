"""`--workers RULE=N` on the command line: the number of worker processes of a rule, overriding the file."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline import errors

if TYPE_CHECKING:
    from pipeline.config.load import Config

MAX_WORKERS = 64


def workers(items: list[str], cfg: Config) -> dict[str, int]:
    """{rule: N} from `RULE=N` items, each rule known to `cfg`; 0 means no local worker (the rule's are remote)."""
    out = {}
    for item in items:
        name, _, n = item.partition("=")
        if not n.isdigit() or int(n) > MAX_WORKERS:
            raise errors.ConfigError("--workers", [f"expected RULE=N with 0 <= N <= {MAX_WORKERS} (got {item!r})"])
        try:
            cfg.rule(name)
        except KeyError as e:
            raise errors.ConfigError("--workers", [str(e.args[0])]) from None
        out[name] = int(n)
    return out
