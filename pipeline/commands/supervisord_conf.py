"""`pipeline supervisord-conf`: the supervisord configuration `pipeline up` runs, for operators who run their own
supervisord.

By default it prints the whole file `pipeline up` writes into its run directory (usable with
`supervisord -c FILE`). `--programs-only` prints just the `[program:...]` sections and a `[group:pipeline]`, for
the system supervisord's `/etc/supervisor/conf.d/`. Either way the programs are exactly those of `pipeline up`
(`programs.programs`, rendered by `programs.render`): same commands, priorities, stop timeouts and exit codes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import PipelineError
from pipeline.supervision import programs
from pipeline.supervision import run_dir as rundir

if TYPE_CHECKING:
    from pipeline.config import load as config


def conf_text(cfg: config.Config, run_dir: Path, log_level: str = "info", log_dir: Path | None = None,
              programs_only: bool = False, user: str | None = None) -> str:
    """The supervisord.conf text for `cfg` (worker overrides already applied)."""
    progs = programs.programs(cfg, run_dir, log_level)
    text = programs.render(progs, run_dir, log_dir)
    if not (programs_only or user):
        return text
    return _trim(text, [p.name for p in progs], programs_only, user)


def _trim(text: str, names: list[str], programs_only: bool, user: str | None) -> str:
    """Keep only program sections (plus a group) and/or add `user=` to each program."""
    out: list[str] = []
    keep = not programs_only
    for line in text.splitlines():
        if line.startswith("["):
            keep = line.startswith("[program:") or not programs_only
        if keep:
            out.append(line)
            if user and line.startswith("[program:"):
                out.append(f"user={user}")
    if programs_only:
        out += ["" if out and out[-1] else None, "[group:pipeline]", f"programs={','.join(names)}", ""]
    return "\n".join(line for line in out if line is not None)


def cmd_supervisord_conf(args: argparse.Namespace) -> int:
    """`pipeline supervisord-conf`: print the supervisord configuration `pipeline up` would run."""
    from pipeline.config import load as config
    from pipeline.config import overrides

    try:
        cfg = config.load(args.config)
        cfg = cfg.with_workers(overrides.workers(args.workers, cfg))
    except PipelineError as e:
        print(f"pipeline: {e}", file=sys.stderr)
        return e.exit_code
    run_dir = rundir.chosen(args.run_dir, cfg)
    log_dir = Path(args.log_dir).resolve() if args.log_dir else None
    sys.stdout.write(conf_text(cfg, run_dir, args.log_level or "info", log_dir, args.programs_only, args.user))
    return 0


def add_commands(sub: Any) -> None:
    text = "print the supervisord configuration `pipeline up` would run (for your own supervisord)"
    sp = sub.add_parser("supervisord-conf", help=text, description=text)
    sp.set_defaults(func=cmd_supervisord_conf)
    sp.add_argument("-c", "--config", required=True, help="the YAML configuration file")
    sp.add_argument("--workers", action="append", default=[], metavar="RULE=N", help="override workers of RULE")
    sp.add_argument("--run-dir", help="sockets and supervisord files (default /tmp/pipeline-NAME); must be writable")
    sp.add_argument("--log-dir", help="each process logs to rotated files here (default: supervisord's stdout)")
    sp.add_argument("--log-level", help="DEBUG, INFO, WARNING... of the stages (default INFO)")
    sp.add_argument("--programs-only", action="store_true",
                    help="only the [program:...] sections and a [group:pipeline], for /etc/supervisor/conf.d/")
    sp.add_argument("--user", help="run every program as this user (supervisord must run as root)")
