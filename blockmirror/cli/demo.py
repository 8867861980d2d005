"""``blockmirror demo``: the whole flow on a built-in image, under a live writer.

Makes a sparse image (a quarter of it data, in scattered 4 MiB extents),
turns tracking on, starts a writer process at a steady rate, syncs the image
with a short target downtime and --verify, stops the writer and prints what
happened pass by pass.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from blockmirror.tracking.tracker import Tracker
from blockmirror.units import format_bytes, format_rate, format_seconds

EXTENT = 4 << 20


def make_demo_image(path: str, size: int, data_fraction: float = 0.25, seed: int = 7) -> int:
    """A sparse image with DATA_FRACTION of SIZE in random-content extents."""
    import random

    rng = random.Random(seed)
    slots = max(1, size // EXTENT)
    chosen = sorted(rng.sample(range(slots), max(1, int(slots * data_fraction))))
    with open(path, "wb") as f:
        f.truncate(size)
        for slot in chosen:
            f.seek(slot * EXTENT)
            f.write(rng.randbytes(min(EXTENT, size - slot * EXTENT)))
        f.flush()
        os.fsync(f.fileno())
    return len(chosen) * EXTENT


def run_demo(args: argparse.Namespace) -> int:
    """The demo; --size and --rate come checked by the command's parser (16M
    to 64G, and a rate in bytes/s). A temporary work folder is removed
    whatever happens; in a --dir folder the demo's own files are removed
    when it fails."""
    from blockmirror.errors import InvalidInputError, OutOfSpaceError
    from blockmirror.migration.precheck import free_bytes

    size = int(args.size)
    rate = int(args.rate)
    if args.dir is not None:
        if args.dir == "":
            raise InvalidInputError("--dir must not be empty")
        if os.path.lexists(args.dir) and not os.path.isdir(args.dir):
            raise InvalidInputError(f"--dir {args.dir} exists and is not a folder")
    workdir = args.dir or tempfile.mkdtemp(prefix="blockmirror-demo-")
    try:
        os.makedirs(workdir, exist_ok=True)
        if os.statvfs(workdir).f_flag & os.ST_RDONLY:
            raise InvalidInputError(f"--dir {workdir} is on a read-only filesystem")
        # a quarter of the image is data, copied once: room for both, and some
        need = size // 2 + (64 << 20)
        if free_bytes(workdir) < need:
            raise OutOfSpaceError(
                f"the demo needs {format_bytes(need)} at {workdir}, "
                f"{format_bytes(free_bytes(workdir))} free", workdir)
        return _run_demo(args, workdir, size, rate)
    finally:
        if not args.dir:
            shutil.rmtree(workdir, ignore_errors=True)


def _run_demo(args: argparse.Namespace, workdir: str, size: int, rate: int) -> int:
    src_dir, dst_dir = os.path.join(workdir, "src"), os.path.join(workdir, "dst")
    os.makedirs(src_dir, exist_ok=True)
    os.makedirs(dst_dir, exist_ok=True)
    image = os.path.join(src_dir, "demo.img")
    for stale in (image, image + ".cbt", os.path.join(dst_dir, "demo.img"),
                  os.path.join(dst_dir, "demo.img.bm-manifest")):
        if os.path.lexists(stale):
            os.unlink(stale)
    try:
        return _demo_steps(args, workdir, image, dst_dir, size, rate)
    except BaseException:
        # Never leave a half-made demo behind in the user's folder.
        for made in (image, image + ".cbt", os.path.join(dst_dir, "demo.img"),
                     os.path.join(dst_dir, "demo.img.bm-manifest")):
            with contextlib.suppress(OSError):
                os.unlink(made)
        raise


def _wait_for_first_write(image: str, writer: subprocess.Popen[bytes]) -> None:
    """Until the writer's first tracked write (a loaded machine may take
    seconds to start it; a sync before then would show no live writer)."""
    deadline = time.monotonic() + 30
    with Tracker.open(image) as tracker:
        while tracker.info().last_write_ns == 0:
            if writer.poll() is not None:
                raise OSError(errno.EIO, f"the demo writer exited early ({writer.returncode})")
            if time.monotonic() > deadline:
                raise OSError(errno.ETIMEDOUT, "the demo writer did not start writing in 30 s")
            time.sleep(0.02)
    time.sleep(0.3)  # let it run a little before the sync starts


def _demo_steps(args: argparse.Namespace, workdir: str, image: str, dst_dir: str, size: int,
                rate: int) -> int:
    from blockmirror.cli.progress import ProgressLine
    from blockmirror.migration import sync

    src_dir = os.path.dirname(image)
    say = (lambda *a: None) if args.json else print
    say(f"demo: making a {format_bytes(size)} sparse image in {src_dir} ...")
    data = make_demo_image(image, size)
    Tracker.create(image).close()
    say(f"demo: {format_bytes(data)} of data; starting a writer at {format_rate(rate)} "
        "(64 KiB random writes, hot spot)")
    stats_path = os.path.join(workdir, "writer-stats.json")
    writer = subprocess.Popen(
        [sys.executable, "-m", "blockmirror.cli.workload", image, "--rate", str(rate),
         "--write-size", "64k", "--pattern", "hotspot", "--seed", "1", "--stats", stats_path],
    )
    try:
        _wait_for_first_write(image, writer)
        say(f"demo: blockmirror sync {image} {dst_dir}/ --target-downtime "
            f"{args.target_downtime}s --verify")
        result = sync(image, dst_dir, target_downtime=args.target_downtime, verify=True,
                      progress=None if args.json else ProgressLine(sys.stderr))
    finally:
        writer.send_signal(signal.SIGTERM)
        writer.wait(timeout=30)
    writer_rate = 0.0
    if os.path.exists(stats_path):
        with open(stats_path) as f:
            writer_rate = float(json.load(f)["rate"])
    if args.json:
        out = result.to_dict()
        out["writer_rate"] = writer_rate
        print(json.dumps(out))
    else:
        print(result.summary())
        print(f"{'pass':>4} {'kind':<6} {'bytes':>10} {'seconds':>8} {'throughput':>12} "
              f"{'dirty left':>10}")
        for p in result.passes:
            print(f"{p.index:>4} {p.kind:<6} {format_bytes(p.bytes):>10} {p.seconds:>8.3f} "
                  f"{format_rate(p.throughput):>12} {format_bytes(p.dirty_left):>10}")
        print(f"writer kept writing at {format_rate(writer_rate)}; writers paused for "
              f"{format_seconds(result.downtime)} (target {format_seconds(args.target_downtime)})")
        print("the copy matched the source at the switchover instant (verified)")
    return 0
