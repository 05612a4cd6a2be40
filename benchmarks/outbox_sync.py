"""What the outbox's `synchronous` setting costs egress: rows stored per second, one transaction per frame as
egress writes them (and each frame's rows deleted again, as PUBACKs do), for `full` and `normal`.

    python benchmarks/outbox_sync.py [--dir DIR] [--seconds 3] [--json OUT]

DIR should be on the disk the data directory will live on (the default: a temporary folder under it)."""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from pipeline.stages.egress.outbox import Outbox

FRAMES = (1, 8, 32)  # rows per frame: one message at low rates, a dozen or more once ingress reads in batches


def rate(folder: Path, synchronous: str, frame: int, seconds: float) -> float:
    """Rows per second stored (and deleted) in frames of `frame` rows."""
    outbox = Outbox(folder / f"bench-{synchronous}-{frame}.sqlite3", 1 << 40, synchronous)
    rows = [("local", "bench/out", b'{"seq": 1, "ts": 1700000000.0}' * 4, 1, 0, "bench", 1.0)] * frame
    done = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        outbox.add(rows)
        stored = outbox.after("local", 0, frame)
        outbox.delete([(r.id, len(r.payload)) for r in stored])
        done += frame
    took = time.perf_counter() - t0
    outbox.close()
    return done / took


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", help="where to write the test databases (default: a temporary folder)")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--json", help="write the figures here too")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        figures = {s: {f: round(rate(Path(tmp), s, f, args.seconds)) for f in FRAMES} for s in ("full", "normal")}
    print(f"rows/s stored and deleted, one transaction per frame ({platform.node()}, {args.dir or 'tmp'}):")
    print("rows per frame  " + "".join(f"{f:>10}" for f in FRAMES))
    for setting, by_frame in figures.items():
        print(f"{setting:<16}" + "".join(f"{by_frame[f]:>10,}" for f in FRAMES))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows_per_s": figures, "seconds": args.seconds,
                                               "dir": args.dir, "host": platform.node()}, indent=2))


if __name__ == "__main__":
    main()
