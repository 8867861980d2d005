"""An incremental `blockmirror sync` to an ``nfs://`` URL against a full one
to the same file, same run, interleaved rounds (issue 12: incremental onto
NFS updates the file in place with what changed since the last sync).

    python bench/remote_nfs_incremental.py [--size 1024] [--data 256] [--change 8]
                                           [--rounds 3] [--workers 4]

Root only: nfs-ganesha in a network namespace as in bench/remote_nfs.py.
The source is SIZE MiB with DATA MiB of random data (its layout), tracked.
Before each timed sync CHANGE MiB of 64 KiB granules, spread at random
over the data, are rewritten through the tracker. Timed: the incremental
sync (in place, only the changed granules sent), the full copy of a tracked
source (``--force``: through the partial, and it keeps a manifest, so the
copied data is read again to digest it), and the full copy of an untracked
twin of the source (no manifest: what bench/remote_nfs.py measures). Times
are wall clock of the whole command (Python's start-up included) and the
sync's own ``elapsed``; ratios are over the incremental's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from remote_nfs import MiB, _remove, _source  # bench/remote_nfs.py, beside this file

GRANULE = 64 * 1024


def _sync(src: Path, url: str, workers: int, *options: str) -> tuple[float, dict[str, object]]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "blockmirror", "sync", str(src), url, "--json",
                           "--workers", str(workers), *options], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"blockmirror sync failed: {done.stderr}")
    return wall, json.loads(done.stdout)


def _change(src: Path, data: list[int], nbytes: int, rng: random.Random) -> None:
    """Rewrite NBYTES of granules picked from DATA (their offsets), tracked."""
    from blockmirror import TrackedImage

    with TrackedImage(str(src)) as image:
        for offset in rng.sample(data, min(len(data), nbytes // GRANULE)):
            image.pwrite(os.urandom(GRANULE), offset)


def _data_granules(src: Path) -> list[int]:
    out, fd = [], os.open(src, os.O_RDONLY)
    try:
        offset, size = 0, os.fstat(fd).st_size
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.extend(range(start // GRANULE * GRANULE, end, GRANULE))
            offset = end
    finally:
        os.close(fd)
    return out


def _rounds(src: Path, twin: Path, server: object, folder: Path, args: argparse.Namespace
            ) -> dict[str, float]:
    url, twin_url = server.url("bm.img"), server.url("twin.img")  # type: ignore[attr-defined]
    _sync(src, url, args.workers)  # the first copy, with its manifest
    data, rng = _data_granules(src), random.Random(7)
    kinds = ["incremental", "force", "untracked"]
    walls: dict[str, list[float]] = {kind: [] for kind in kinds}
    inside: dict[str, list[float]] = {kind: [] for kind in kinds}
    for r in range(args.rounds):
        for kind in kinds if r % 2 == 0 else kinds[::-1]:
            if kind == "untracked":
                _remove(twin_url)
                wall, result = _sync(twin, twin_url, args.workers)
            else:
                _change(src, data, args.change * MiB, rng)
                wall, result = _sync(src, url, args.workers,
                                     *(["--force"] if kind == "force" else []))
                if bool(result["incremental"]) != (kind == "incremental"):
                    raise RuntimeError(f"{kind} sync was not what was asked: {result['notes']}")
            walls[kind].append(wall)
            inside[kind].append(float(result["elapsed"]))  # type: ignore[arg-type]
    if (folder / "bm.img").read_bytes() != src.read_bytes():
        raise RuntimeError("blockmirror's copy differs from the source")
    out = {kind: statistics.median(t) for kind, t in walls.items()}
    out.update({f"{kind}_inside": statistics.median(t) for kind, t in inside.items()})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="MiB of image (default 1024)")
    parser.add_argument("--data", type=int, default=256, help="MiB of data in it (default 256)")
    parser.add_argument("--change", type=int, default=8, help="MiB changed per sync (default 8)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args(argv)
    if os.geteuid() != 0 or shutil.which("ganesha.nfsd") is None:
        print("needs root and ganesha.nfsd (nfs-ganesha)", file=sys.stderr)
        return 2
    from ganeshatools import ganesha
    from netnstools import two_hosts

    from blockmirror import Tracker

    work = Path(tempfile.mkdtemp(prefix="bm-nfs-inc-bench-", dir="/dev/shm"))
    try:
        src, twin = work / "src.img", work / "twin.img"
        for image in (src, twin):  # the same layout, other random data
            _source(image, args.size * MiB, min(args.data, args.size) * MiB)
        Tracker.create(str(src)).close()
        folder = work / "export"
        folder.mkdir()
        with ExitStack() as stack:
            link = stack.enter_context(two_hosts(delay_ms=0.5, rate="10gbit"))
            server = stack.enter_context(ganesha(link, folder, work / "ganesha"))
            m = _rounds(src, twin, server, folder, args)
        print(f"{args.size} MiB image, {args.data} MiB data, {args.change} MiB changed per "
              f"sync, {args.rounds} rounds interleaved, medians, --workers {args.workers}, "
              f"{'netem 0.5 ms each way' if link.shaped else 'unshaped veth (no netem)'}")
        for suffix, what in (("", "command, wall clock"), ("_inside", "the sync itself")):
            inc = m[f"incremental{suffix}"]
            print(f"{what}: incremental {inc:.3f} s; full --force {m['force' + suffix]:.3f} s "
                  f"({m['force' + suffix] / inc:.1f}x); full untracked "
                  f"{m['untracked' + suffix]:.3f} s ({m['untracked' + suffix] / inc:.1f}x)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0

if __name__ == "__main__":
    sys.exit(main())
