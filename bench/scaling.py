#!/usr/bin/env python3
"""What grows with what: time and peak RSS of blockmirror by image size and by data (issue 11).

    python bench/scaling.py                          # the full table, 5 rounds
    python bench/scaling.py --rounds 3 --only size   # just the apparent-size column
    python bench/scaling.py --dir /work/tmp/scale    # big sparse files go here

Two series of sparse images, each holding random data in 4 MiB extents at
random 4 MiB slots:

- **by apparent size**: 64 MiB of data in images of 1 GiB, 1 TiB and 15 TiB
  (``--sizes``; ext4 stops at 16 TiB, XFS on a loop device goes to 64 TiB);
- **by data**: 64 MiB, 1 GiB and 4 GiB of data in one 1 TiB image
  (``--datas``, ``--data-image``).

For each image, each round runs, as separate processes (what a user runs):

- ``sync`` of the untracked image to a new copy, and of a tracked copy of it
  (a sidecar beside the source) to another new copy - durable, manifest
  written;
- ``verify`` of the source against its copy;
- an incremental ``sync`` onto the tracked copy's copy after 1 MiB (16
  granules of 64 KiB) was written through ``TrackedImage``;
- the tracker's own seal: a process takes a change id, writes 16 random
  granules through ``TrackedImage`` and closes it - the last writer out
  seals the eras (*call alone* is that close); the next writer's open
  checks them;
- the peer ``cp --sparse=always SRC DST && sync DST``.

Each process reports its own in-process seconds (the sync or verify call
alone, without the interpreter's start) and the parent records its wall time
and peak RSS (GNU ``/usr/bin/time``'s maximum resident set size).
Rounds interleave the contenders; medians are printed with the targets of
issue 11 as MET or MISSED:

- 1 TiB / 64 MiB: ``sync`` (in-process) <= 1.5x ``cp --sparse=always &&
  sync DST``, peak RSS <= 100 MiB;
- 15 TiB / 64 MiB, untracked and tracked: ``sync`` under 2 s (process wall),
  peak RSS <= 100 MiB.

A script, not a test: pytest never collects it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
EXTENT = 4 * MiB
RSS_TARGET = 100 * MiB

# The child: one blockmirror command, started and ended as the command is.
CHILD = r"""
import sys
op, a, b = sys.argv[1:4]
sys.argv = ["blockmirror", op, a, b, *(["--quiet"] if op == "sync" else [])]
from blockmirror.cli.main import entry  # what python -m blockmirror runs, exit included
entry()
"""
# In-process seconds of the call itself, imports excluded.
CALL = r"""
import json, sys, time
op, a, b = sys.argv[1:4]
if op == "sync":
    from blockmirror.migration import sync as call
else:
    from blockmirror.copying.verify import compare_files as call
t0 = time.perf_counter()
out = call(a, b)
seconds = time.perf_counter() - t0
if op == "verify" and out:
    sys.exit(5)
print(json.dumps({"seconds": seconds, "code": 0}))
"""


# The last writer's close (the era seal) and the next writer's open (the
# check), timed in a process of their own after 16 writes of a new era.
SEAL = r"""
import json, random, sys, time
from blockmirror import TrackedImage, Tracker
path, seed = sys.argv[1], int(sys.argv[2])
with Tracker.open(path) as t:
    t.change_id()  # the writes below raise eras, as after any backup
rng = random.Random(seed)
img = TrackedImage(path)
for _ in range(16):
    img.pwrite(b"s" * 4096, rng.randrange(img.size // 65536) * 65536)
t0 = time.perf_counter()
img.close()
seal = time.perf_counter() - t0
t0 = time.perf_counter()
TrackedImage(path).close()
print(json.dumps({"seconds": seal, "open": time.perf_counter() - t0, "code": 0}))
"""


@dataclass
class Sample:
    wall: list[float] = field(default_factory=list)
    call: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)

    def median(self, what: str) -> float:
        values = getattr(self, what)
        return float(statistics.median(values)) if values else float("nan")


def measured(argv: list[str]) -> tuple[float, int, str]:
    """Run ARGV; its wall seconds, peak RSS (bytes) and stdout. Raises on
    failure. The RSS is GNU time's (``%M``) where installed: ``wait4`` of a
    child forked from this interpreter would count this interpreter's pages
    until the exec."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with tempfile.NamedTemporaryFile(prefix="bm-rss-") as rss_file:
        wrapped = (["/usr/bin/time", "-f", "%M", "-o", rss_file.name, *argv]
                   if os.path.exists("/usr/bin/time") else argv)
        t0 = time.perf_counter()
        # From ROOT: "-c" and "-m" put the working folder first on sys.path.
        proc = subprocess.run(wrapped, capture_output=True, env=env, check=False, cwd=ROOT)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: "
                               f"{proc.stderr.decode()[-400:]}")
        text = Path(rss_file.name).read_text().strip()
    rss = int(text.splitlines()[-1]) * 1024 if text else 0
    return wall, rss, proc.stdout.decode()


def make_image(path: Path, size: int, data: int, seed: int) -> None:
    rng = random.Random(seed)
    slots = sorted(rng.sample(range(size // EXTENT), data // EXTENT))
    with open(path, "wb") as f:
        f.truncate(size)
        for slot in slots:
            f.seek(slot * EXTENT)
            f.write(rng.randbytes(EXTENT))
        f.flush()
        os.fsync(f.fileno())


def remove_copy(path: Path) -> None:
    for p in (path, Path(str(path) + ".bm-manifest"), Path(str(path) + ".cbt")):
        p.unlink(missing_ok=True)


@dataclass
class Case:
    """One image: its source, a tracked twin, and where the copies go."""

    label: str
    size: int
    data: int
    src: Path
    tracked: Path
    rows: dict[str, Sample] = field(default_factory=dict)

    def row(self, name: str) -> Sample:
        return self.rows.setdefault(name, Sample())


def bm(case: Case, name: str, op: str, a: Path, b: Path) -> None:
    """Time blockmirror OP A B twice: as the command (wall, RSS) and as the
    call alone (in-process seconds)."""
    row = case.row(name)
    wall, rss, _ = measured([sys.executable, "-c", CHILD, op, str(a), str(b)])
    row.wall.append(wall)
    row.rss.append(rss)
    if op == "sync":
        remove_copy(b)  # the call alone makes the same new copy again
    _, _, out = measured([sys.executable, "-c", CALL, op, str(a), str(b)])
    row.call.append(json.loads(out.strip().splitlines()[-1])["seconds"])


def peer(case: Case, dst: Path) -> None:
    row = case.row("cp --sparse=always && sync DST")
    t0 = time.perf_counter()
    _, rss, _ = measured(["cp", "--sparse=always", str(case.src), str(dst)])
    subprocess.run(["sync", str(dst)], check=True)
    total = time.perf_counter() - t0
    row.wall.append(total)
    row.call.append(total)
    row.rss.append(rss)


def one_round(case: Case, d: Path, r: int) -> None:
    copy, tcopy, pcopy = d / "copy.img", d / "tracked-copy.img", d / "peer.img"
    steps: list[Callable[[], None]] = [
        lambda: bm(case, "sync, untracked", "sync", case.src, copy),
        lambda: bm(case, "sync, tracked", "sync", case.tracked, tcopy),
        lambda: peer(case, pcopy),
    ]
    for p in (copy, tcopy, pcopy):
        remove_copy(p)
    for step in steps[r % 3:] + steps[:r % 3]:
        os.sync()
        step()
    os.sync()
    bm(case, "verify (source vs copy)", "verify", case.src, copy)
    write_tracked(case.tracked, seed=r)
    os.sync()
    incremental(case, tcopy)
    seal(case, seed=r)
    for p in (copy, tcopy, pcopy):
        remove_copy(p)


def incremental(case: Case, copy: Path) -> None:
    """An incremental sync onto COPY: both runs go onto the same copy, the
    second after another 1 MiB was written."""
    row = case.row("incremental sync, 1 MiB changed")
    wall, rss, _ = measured([sys.executable, "-c", CHILD, "sync", str(case.tracked), str(copy)])
    row.wall.append(wall)
    row.rss.append(rss)
    write_tracked(case.tracked, seed=1000 + len(row.call))
    os.sync()
    _, _, out = measured([sys.executable, "-c", CALL, "sync", str(case.tracked), str(copy)])
    row.call.append(json.loads(out.strip().splitlines()[-1])["seconds"])


def seal(case: Case, seed: int) -> None:
    """The last writer's close after 16 writes (call alone) and the next
    writer's open (in the note column), in a process of their own."""
    row = case.row("last writer's close (era seal), 16 writes")
    wall, rss, out = measured([sys.executable, "-c", SEAL, str(case.tracked), str(seed)])
    figures = json.loads(out.strip().splitlines()[-1])
    row.wall.append(wall)
    row.rss.append(rss)
    row.call.append(figures["seconds"])
    case.row("next writer's open (era check)").call.append(figures["open"])


def write_tracked(image: Path, seed: int) -> None:
    """16 granules of 64 KiB rewritten through the tracker, at random."""
    sys.path.insert(0, str(ROOT))
    from blockmirror import TrackedImage

    rng = random.Random(seed)
    with TrackedImage(str(image)) as w:
        for _ in range(16):
            w.pwrite(rng.randbytes(64 * KiB), rng.randrange(w.size // (64 * KiB)) * 64 * KiB)


def prepare(d: Path, label: str, size: int, data: int, seed: int) -> Case:
    src, tracked = d / f"{label}-src.img", d / f"{label}-tracked.img"
    make_image(src, size, data, seed)
    subprocess.run(["cp", "--sparse=always", str(src), str(tracked)], check=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-m", "blockmirror", "track", "enable", str(tracked)],
                   check=True, stdout=subprocess.DEVNULL, env=env)
    return Case(label, size, data, src, tracked)


def fmt_size(n: int) -> str:
    for unit, scale in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB)):
        if n >= scale:
            return f"{n / scale:g} {unit}"
    return f"{n} B"


def fmt_s(x: float) -> str:
    if x != x:
        return "n/a"
    return f"{x * 1e3:.1f} ms" if x < 0.01 else f"{x * 1e3:.0f} ms" if x < 1 else f"{x:.2f} s"


def verdicts(case: Case) -> dict[str, str]:
    """MET/MISSED of issue 11's targets for this image, by row."""
    out: dict[str, str] = {}
    peer_row = case.rows.get("cp --sparse=always && sync DST")
    for name, row in case.rows.items():
        rss_ok = row.median("rss") <= RSS_TARGET
        if not name.startswith("sync, "):
            continue
        if case.size == TiB and case.data == 64 * MiB and peer_row is not None:
            ratio = row.median("call") / peer_row.median("call")
            ok = ratio <= 1.5 and rss_ok
            out[name] = (f"{'MET' if ok else 'MISSED'} (≤ 1.5x cp: {ratio:.2f}x, "
                         f"RSS ≤ 100 MiB: {'yes' if rss_ok else 'no'})")
        elif case.size >= 15 * TiB and case.data == 64 * MiB:
            ok = row.median("wall") < 2.0 and rss_ok
            out[name] = (f"{'MET' if ok else 'MISSED'} (< 2 s: {fmt_s(row.median('wall'))}, "
                         f"RSS ≤ 100 MiB: {'yes' if rss_ok else 'no'})")
    return out


def table(cases: list[Case]) -> str:
    lines = ["| image | data | what | command wall | call alone | peak RSS | target |",
             "|---|---|---|---|---|---|---|"]
    for case in cases:
        marks = verdicts(case)
        for name, row in case.rows.items():
            rss = row.median("rss")
            lines.append(f"| {fmt_size(case.size)} | {fmt_size(case.data)} | {name} | "
                         f"{fmt_s(row.median('wall'))} | {fmt_s(row.median('call'))} | "
                         f"{f'{rss / MiB:.0f} MiB' if rss == rss else 'n/a'} | "
                         f"{marks.get(name, '')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--only", choices=("size", "data", "both"), default="both")
    p.add_argument("--sizes", default="1G,1T,15T", help="apparent sizes, 64 MiB of data each")
    p.add_argument("--datas", default="64M,1G,4G", help="data amounts in --data-image")
    p.add_argument("--data-image", default="1T", help="image size of the data series")
    p.add_argument("--dir", help="working folder (default: a new one in $TMPDIR)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from blockmirror.units import parse_size

    made = args.dir is None
    d = Path(args.dir or tempfile.mkdtemp(prefix="bm-scaling-"))
    d.mkdir(parents=True, exist_ok=True)
    specs: list[tuple[int, int]] = []
    if args.only in ("size", "both"):
        specs += [(parse_size(s), 64 * MiB) for s in args.sizes.split(",")]
    if args.only in ("data", "both"):
        specs += [(parse_size(args.data_image), parse_size(x)) for x in args.datas.split(",")]
    specs = list(dict.fromkeys(specs))  # 1 TiB / 64 MiB is in both series
    started = datetime.datetime.now().astimezone()
    cases = []
    try:
        for i, (size, data) in enumerate(specs):
            print(f"scaling: {fmt_size(size)} / {fmt_size(data)} ...", file=sys.stderr)
            case = prepare(d, f"c{i}", size, data, seed=i)
            for r in range(args.rounds):
                one_round(case, d, r)
            for path in (case.src, case.tracked):
                remove_copy(path)
            cases.append(case)
    finally:
        if made:
            shutil.rmtree(d, ignore_errors=True)
    print(f"# blockmirror scaling — {started:%Y-%m-%d %H:%M %Z}\n")
    print(f"{platform.node()} · Linux {platform.release()} · Python "
          f"{platform.python_version()} · {os.cpu_count()} CPUs · {d} · "
          f"`python bench/scaling.py {' '.join(argv or sys.argv[1:])}` · "
          f"medians of {args.rounds} rounds\n")
    print(table(cases))
    return 0


if __name__ == "__main__":
    sys.exit(main())
