"""Hot-block deferral, measured: bytes re-copied and downtime of `sync` with
and without it, same writer, interleaved rounds (issue 10).

    python bench/defer_hot.py [--rate-share 0.8] [--pattern hotspot] [--rounds 3]

A tracked image of SIZE (half data) under a `blockmirror.cli.workload`
writer at RATE_SHARE x the copy cap; each round syncs once with
defer_hot=True and once with False (order alternating). Prints medians and
the ratio, and MET/MISSED against issue 10's target (>= 30 % fewer bytes
re-copied, downtime within target)."""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from blockmirror import Tracker, sync

MiB = 1 << 20


def _image(path: str, size: int) -> int:
    """SIZE bytes, every other MiB data: returns the data bytes."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, 2 * MiB):
            f.seek(off)
            f.write(os.urandom(MiB))
    Tracker.create(path).close()
    return size // 2


def _one(folder: str, args: argparse.Namespace, defer: bool) -> tuple[float, float]:
    src = os.path.join(folder, "src.img")
    dst = os.path.join(folder, "dst")
    for p in (src, src + ".cbt"):
        if os.path.exists(p):
            os.unlink(p)
    shutil.rmtree(dst, ignore_errors=True)
    os.mkdir(dst)
    data = _image(src, args.size * MiB)
    cap = args.copy_cap * MiB
    writer = subprocess.Popen(
        [sys.executable, "-m", "blockmirror.cli.workload", src, "--rate",
         str(int(args.rate_share * cap)), "--write-size", "64k", "--pattern", args.pattern,
         "--seed", "7"])
    try:
        time.sleep(1.0)
        result = sync(src, dst, target_downtime=args.target, rate_limit=cap, max_passes=40,
                      defer_hot=defer)
    finally:
        writer.terminate()
        writer.wait()
    return (result.bytes_copied - data) / (args.size * MiB), result.downtime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256, help="MiB (default 256)")
    ap.add_argument("--copy-cap", type=int, default=64, help="MiB/s (default 64)")
    ap.add_argument("--rate-share", type=float, default=0.8)
    ap.add_argument("--pattern", default="hotspot")
    ap.add_argument("--target", type=float, default=0.5, help="target downtime s")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    folder = tempfile.mkdtemp(prefix="bm-defer-", dir="/dev/shm" if os.path.isdir("/dev/shm")
                              else None)
    runs: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    try:
        for r in range(args.rounds):
            for defer in ((True, False) if r % 2 == 0 else (False, True)):
                runs[defer].append(_one(folder, args, defer))
                print(f"round {r + 1} defer={defer}: re-copied {runs[defer][-1][0]:.2f}x image,"
                      f" downtime {runs[defer][-1][1] * 1000:.0f} ms", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    med = {d: (statistics.median(x for x, _ in v), statistics.median(y for _, y in v))
           for d, v in runs.items()}
    saved = 1 - med[True][0] / med[False][0] if med[False][0] > 0 else 0.0
    print(f"\n{args.pattern} at {args.rate_share}x C ({args.copy_cap} MiB/s), {args.rounds} "
          f"rounds: re-copied {med[True][0]:.2f}x (defer) vs {med[False][0]:.2f}x (no defer) "
          f"of the image: {saved * 100:.0f} % fewer; downtime {med[True][1] * 1000:.0f} vs "
          f"{med[False][1] * 1000:.0f} ms (target {args.target * 1000:.0f} ms)")
    ok = saved >= 0.30 and max(y for _, y in runs[True]) <= args.target
    print("MET" if ok else "MISSED", ": >= 30 % fewer bytes re-copied, downtime within target")
    return 0


if __name__ == "__main__":
    sys.exit(main())
