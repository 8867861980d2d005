#!/usr/bin/env python3
"""blockmirror against the Debian peers, same run (issues 3 and 5, "Measure it").

    python bench/compare_tools.py                       # everything, defaults below
    python bench/compare_tools.py --only bulk,verify --reps 7
    python bench/compare_tools.py --size 4G --data 1G --incr-size 4G --dir /work/tmp

Sections (``--only``, comma-separated; all by default):

bulk
    A sparse image (``--size`` apparent, ``--data`` of random data in 4 MiB
    extents, scattered: 4 GiB / 1 GiB gives 256 extents) copied to a new file
    by the ``blockmirror sync`` command (untracked source: one bulk pass,
    fsync, rename, manifest; run as ``sys.executable -m blockmirror`` from
    this tree, interpreter start, imports and exit included: issue 11's
    durable target is about this row), by ``blockmirror.sync`` called
    in-process (the same minus the interpreter), by a ``Copier`` directly,
    and by ``nbdcopy``, ``cp
    --sparse=always`` and ``qemu-img convert -O raw``. DURABLE rows end with
    the copy on stable storage (sync's own fsync, ``nbdcopy --flush``, ``cp ...
    && sync DST``, ``qemu-img convert ... && sync DST``, a Copier + fsync) and
    are paired with ``dd if=/dev/zero bs=4M conv=fsync`` writing as many bytes:
    the disk's sequential-write limit. CACHED rows leave the copy in the page
    cache (no fsync anywhere) and show CPU efficiency. Every copy is checked
    once: identical to the source (``qemu-img compare``, else ``cmp``) and
    sparse (allocated bytes about the data size).
tib
    1 TiB apparent holding 64 MiB of data (16 x 4 MiB), synced untracked and
    tracked (durable); target (issue 11) <= 1.5x ``cp --sparse=always && sync
    DST``; the copy's and the manifest's allocation are shown. Peers for
    context; peak RSS and larger images: ``bench/scaling.py``.
dirty
    A dirty pass on its own: ``fetch_and_clear_array`` + ``Copier.copy_extents``
    of N MiB of scattered 64 KiB granules written through ``TrackedImage``, on
    a 1 GiB and a 1 TiB image (cached: no fsync). The time must follow N, not
    the image size.
incremental
    ``--incr-size`` fully written with random data, tracked. Each round
    rewrites 1 % of its 64 KiB blocks through ``TrackedImage``, then brings
    four earlier copies up to date: incremental ``sync`` (change id), ``sync``
    falling back to a hash resync (the copy's manifest marked as mid-update),
    a full ``sync --force``, and ``rsync --inplace --no-whole-file`` (+ ``sync
    DST`` for the durable row; its own time is the cached row). Every copy is
    compared with the source after every round.
verify
    Identical, page-cached images, every byte compared (worst case):
    ``verify.compare_files`` in-process and the ``blockmirror verify`` command
    against ``cmp`` and ``qemu-img compare``; on the fully written pair of the
    incremental section and on the sparse pair of the bulk section.
startup
    The light commands, where start-up is most of the cost (issue 11): the
    ``blockmirror verify A B`` command on a sparse 1 GiB pair (1 MiB of data)
    and on a 4 GiB / 64 MiB pair against ``qemu-img compare``, ``blockmirror
    track status IMG`` against ``qemu-img info IMG``, and ``blockmirror
    --help``, with the interpreter alone (``python -c pass``, and ``python -I
    -S`` without site's .pth files) as floors. Python runs with compiled
    bytecode, as an installed package has it (``PYTHONPYCACHEPREFIX`` in the
    working folder, warmed once), whatever ``PYTHONDONTWRITEBYTECODE`` says.

Timing: wall clock of the whole operation (subprocesses included); rounds
interleave the contenders in a rotating order so drift hits all of them;
``os.sync()`` (untimed) before each timed run so no earlier run's writeback
competes. Medians over ``--reps`` rounds, ratios of medians within this run.
The source is warm in the page cache throughout. Big files live in ``--dir``
(default: a new folder under $TMPDIR) and are deleted at the end unless
``--keep``.

This is a script, not a test: pytest never collects it (bench/pytest.ini only
collects test_bench_*.py).
"""

from __future__ import annotations

import argparse
import contextlib
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
from typing import Any

import numpy as np

# This tree's blockmirror, in-process as in the commands (see REPO below).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blockmirror import TrackedImage, Tracker
from blockmirror.cli.demo import make_demo_image
from blockmirror.copying.copier import Copier, data_extents
from blockmirror.copying.verify import compare_files
from blockmirror.extents import pairs
from blockmirror.migration import SyncResult
from blockmirror.migration import sync as bm_sync
from blockmirror.migration.manifest import Manifest, manifest_path
from blockmirror.units import parse_size

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
EXTENT = 4 * MiB
GRANULE = 64 * KiB
SYNC_COMMAND = "blockmirror sync SRC DST (the command: python -m blockmirror)"
SYNC_IN_PROCESS = "blockmirror.sync() in-process (no interpreter start or exit)"
SYNC_BASELINE = "blockmirror sync SRC DST (the command), tree"
SECTIONS = ("bulk", "tib", "dirty", "incremental", "verify", "startup")


# -- running things ----------------------------------------------------------------


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


# The tree this script belongs to: ``python -m blockmirror`` runs with it as
# the working folder, so the command loads this tree's code (the working
# folder comes first on sys.path), whatever folder the bench is started from.
REPO = Path(__file__).resolve().parent.parent


def python_env(d: Path) -> dict[str, str]:
    """The environment blockmirror commands run in: compiled bytecode, as an
    installed package has it (``PYTHONPYCACHEPREFIX`` in the working folder),
    whatever ``PYTHONDONTWRITEBYTECODE`` says."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(d / "pycache")
    return env


def blockmirror_argv(*args: str | os.PathLike[str]) -> list[str]:
    """A blockmirror command as the bench runs it: the real interpreter
    (``sys.executable``), never a console script (under pyenv that is a
    bash shim, ~25 ms more), and never through a shell; the peers' binaries
    are run directly too."""
    return [sys.executable, "-m", "blockmirror", *map(os.fspath, args)]


def run(*argv: str | os.PathLike[str], ok: tuple[int, ...] = (0,),
        env: dict[str, str] | None = None, cwd: Path = REPO) -> int:
    """Run a command, output discarded; raise unless its exit code is in OK.
    blockmirror commands run from REPO (see there) unless CWD says."""
    proc = subprocess.run([os.fspath(a) for a in argv], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    if proc.returncode not in ok:
        raise RuntimeError(f"{' '.join(map(str, argv))} exited {proc.returncode}: "
                           f"{proc.stderr.strip()}")
    return proc.returncode


def cmd(*argv: str | os.PathLike[str]) -> Callable[[], None]:
    """A contender's RUN: the command, checked, nothing returned."""

    def go() -> None:
        run(*argv)

    return go


def fsync_path(path: str | os.PathLike[str]) -> None:
    """What coreutils ``sync FILE`` does, in-process."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(*paths: str | os.PathLike[str]) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


def remove_copy(path: str | os.PathLike[str]) -> None:
    """A copy and whatever blockmirror keeps beside it."""
    p = os.fspath(path)
    remove(p, manifest_path(p), p + ".cbt")


def allocated(path: str | os.PathLike[str]) -> int:
    return os.stat(path).st_blocks * 512


def warm(*paths: str | os.PathLike[str]) -> None:
    """Read the data of files once so it sits in the page cache (holes are
    skipped: reading the holes of a 1 TiB image would take minutes)."""
    buf = bytearray(8 * MiB)
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            for start, length in pairs(data_extents(fd, os.fstat(fd).st_size)):
                for off in range(start, start + length, len(buf)):
                    os.preadv(fd, [memoryview(buf)[: min(len(buf), start + length - off)]], off)
        finally:
            os.close(fd)


def identical(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """An independent check (not blockmirror's own verify)."""
    if have("qemu-img"):
        return run("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", a, b, ok=(0, 1)) == 0
    return run("cmp", "-s", a, b, ok=(0, 1)) == 0


def write_random_extents(path: Path, size: int, extents: int, seed: int) -> list[int]:
    """A sparse file of SIZE with EXTENTS random 4 MiB extents at random
    4 MiB-aligned offsets; returns the offsets."""
    rng = random.Random(seed)
    slots = sorted(rng.sample(range(size // EXTENT), extents))
    with open(path, "wb") as f:
        f.truncate(size)
        for slot in slots:
            f.seek(slot * EXTENT)
            f.write(rng.randbytes(EXTENT))
        f.flush()
        os.fsync(f.fileno())
    return [s * EXTENT for s in slots]


def write_full_random(path: Path, size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    chunk = 64 * MiB
    with open(path, "wb") as f:
        for off in range(0, size, chunk):
            f.write(rng.bytes(min(chunk, size - off)))
        f.flush()
        os.fsync(f.fileno())


# -- measuring -------------------------------------------------------------------


@dataclass
class Contender:
    """One way of doing the job. RUN is timed and may return extra figures
    (phase seconds, bytes); PREPARE and AFTER are not timed. CHECK (untimed,
    after the first round) returns a problem, or None if the output is right."""

    label: str
    kind: str  # "durable", "cached" or "" (not about durability)
    run: Callable[[], dict[str, float] | None]
    prepare: Callable[[], None] = lambda: None
    after: Callable[[], None] = lambda: None
    check: Callable[[], str | None] | None = None
    check_every_round: bool = False


@dataclass
class Row:
    section: str
    label: str
    kind: str
    times: list[float] = field(default_factory=list)
    extra: dict[str, list[float]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")

    def extra_median(self, key: str) -> float:
        vals = self.extra.get(key)
        return statistics.median(vals) if vals else float("nan")


class Bench:
    def __init__(self, reps: int, log: Callable[[str], None]) -> None:
        self.reps = reps
        self.log = log
        self.rows: dict[str, dict[str, Row]] = {}

    def rounds(self, section: str, contenders: list[Contender], reps: int | None = None,
               between: Callable[[int], None] | None = None) -> dict[str, Row]:
        """REPS rounds; each runs every contender once, starting one further
        along the list each round. BETWEEN(round) runs (untimed) before each."""
        rows = self.rows.setdefault(section, {})
        for c in contenders:
            rows.setdefault(c.label, Row(section, c.label, c.kind))
        reps = self.reps if reps is None else reps
        for r in range(reps):
            if between is not None:
                between(r)
            order = contenders[r % len(contenders):] + contenders[: r % len(contenders)]
            for c in order:
                row = rows[c.label]
                c.prepare()
                os.sync()
                t0 = time.perf_counter()
                extra = c.run()
                elapsed = time.perf_counter() - t0
                row.times.append(elapsed)
                for k, v in (extra or {}).items():
                    row.extra.setdefault(k, []).append(v)
                if c.check is not None and (r == 0 or c.check_every_round):
                    problem = c.check()
                    if problem:
                        row.problems.append(f"round {r}: {problem}")
                        self.log(f"  !! {c.label}: {problem}")
                c.after()
                self.log(f"  [{section} {r + 1}/{reps}] {c.label:<52} {elapsed:8.3f} s")
        return rows


# -- tables ------------------------------------------------------------------------


def fmt_s(x: float) -> str:
    if x != x:  # nan
        return "n/a"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 0.1:
        return f"{x:.2f}"
    if x >= 0.001:
        return f"{x * 1e3:.1f} ms"
    return f"{x * 1e6:.0f} µs"


def fmt_ratio(a: float, b: float) -> str:
    if not (a == a and b == b) or b <= 0:
        return "n/a"
    return f"{a / b:.2f}"


def table(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join(out)


def spread(row: Row) -> str:
    return f"{fmt_s(min(row.times))}-{fmt_s(max(row.times))}" if row.times else "n/a"


# -- bulk --------------------------------------------------------------------------


def copier_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, workers: int = 4,
                fsync: bool, writeback: bool) -> float:
    """A bare Copier bulk copy of SRC's allocated extents into a new DST
    (sized, optionally fsynced): the engine under ``sync`` without the sync.
    Returns the copy's own seconds."""
    sfd = os.open(src, os.O_RDONLY)
    dfd = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with Copier(sfd, dfd, workers=workers) as c:
            stats = c.copy_extents(c.allocated_extents(), dst_fresh=True,
                                   start_writeback=writeback)
        os.ftruncate(dfd, os.fstat(sfd).st_size)
        if fsync:
            os.fsync(dfd)
    finally:
        os.close(sfd)
        os.close(dfd)
    return stats.seconds


def section_bulk(b: Bench, d: Path, size: int, data: int, workers: int,
                 baseline: Path | None = None) -> str:
    src = d / "bulk-src.img"
    dst = d / "bulk-dst.img"
    b.log(f"bulk: making {size / GiB:g} GiB apparent / {data / MiB:g} MiB data ...")
    make_demo_image(str(src), size, data_fraction=data / size, seed=7)
    data = os.stat(src).st_blocks * 512
    warm(src)
    fd = os.open(src, os.O_RDONLY)
    try:
        extents = data_extents(fd, size)
    finally:
        os.close(fd)
    b.log(f"bulk: {len(extents)} data extents, {data / MiB:.0f} MiB allocated")

    def copy_check() -> str | None:
        if not identical(src, dst):
            return "copy differs from the source"
        if allocated(dst) > data + data // 100 + MiB:
            return f"copy not sparse: {allocated(dst) / MiB:.0f} MiB allocated"
        return None

    def bm_sync_run() -> dict[str, float]:
        res: SyncResult = bm_sync(src, dst)
        return {"bulk pass s": res.passes[0].seconds}

    env = python_env(d)
    # Bytecode compiled and the modules' files cached before the first round.
    run(sys.executable, "-c", "import blockmirror.cli.main, blockmirror.migration.run", env=env)

    def bm_command_run(tree: Path = REPO) -> None:
        run(*blockmirror_argv("sync", "--quiet", src, dst), env=env, cwd=tree)

    if baseline is not None:  # its bytecode too, before the first round
        run(sys.executable, "-c", "import blockmirror.cli.main, blockmirror.migration.run",
            env=env, cwd=baseline)

    def copier_run(fsync: bool, writeback: bool) -> Callable[[], dict[str, float]]:
        def go() -> dict[str, float]:
            return {"copy s": copier_copy(src, dst, workers=workers, fsync=fsync,
                                          writeback=writeback)}
        return go

    def tool_then_fsync(*argv: str | os.PathLike[str]) -> Callable[[], dict[str, float]]:
        def go() -> dict[str, float]:
            t0 = time.perf_counter()
            run(*argv)
            t1 = time.perf_counter()
            run("sync", dst)  # coreutils sync FILE: fsync
            return {"copy s": t1 - t0}
        return go

    cleanup = lambda: remove_copy(dst)  # noqa: E731
    dd_count = max(1, data // EXTENT)
    cs: list[Contender] = [
        Contender(f"dd if=/dev/zero bs=4M count={dd_count} conv=fsync", "durable",
                  cmd("dd", "if=/dev/zero", f"of={dst}", "bs=4M", f"count={dd_count}",
                              "conv=fsync", "status=none"),
                  prepare=cleanup, after=cleanup),
        Contender(SYNC_COMMAND, "durable",
                  bm_command_run, prepare=cleanup, after=cleanup, check=copy_check),
        Contender(SYNC_IN_PROCESS, "durable",
                  bm_sync_run, prepare=cleanup, after=cleanup, check=copy_check),
        *([Contender(f"{SYNC_BASELINE} {baseline}", "durable",
                     lambda: bm_command_run(baseline), prepare=cleanup, after=cleanup,
                     check=copy_check)] if baseline is not None else []),
        Contender(f"Copier ({workers} workers) + start_writeback + fsync", "durable",
                  copier_run(True, True), prepare=cleanup, after=cleanup, check=copy_check),
        Contender(f"Copier ({workers} workers) + fsync, no writeback hint", "durable",
                  copier_run(True, False), prepare=cleanup, after=cleanup, check=copy_check),
        Contender(f"Copier ({workers} workers), no fsync", "cached",
                  copier_run(False, False), prepare=cleanup, after=cleanup, check=copy_check),
    ]
    if have("nbdcopy"):
        cs += [
            Contender("nbdcopy --flush", "durable",
                      cmd("nbdcopy", "--flush", src, dst),
                      prepare=cleanup, after=cleanup, check=copy_check),
            Contender("nbdcopy", "cached", cmd("nbdcopy", src, dst),
                      prepare=cleanup, after=cleanup, check=copy_check),
        ]
    cs += [
        Contender("cp --sparse=always && sync DST", "durable",
                  tool_then_fsync("cp", "--sparse=always", src, dst),
                  prepare=cleanup, after=cleanup, check=copy_check),
        Contender("cp --sparse=always", "cached",
                  cmd("cp", "--sparse=always", src, dst),
                  prepare=cleanup, after=cleanup, check=copy_check),
    ]
    if have("qemu-img"):
        cs += [
            Contender("qemu-img convert -O raw && sync DST", "durable",
                      tool_then_fsync("qemu-img", "convert", "-O", "raw", src, dst),
                      prepare=cleanup, after=cleanup, check=copy_check),
            Contender("qemu-img convert -t unsafe -O raw", "cached",
                      cmd("qemu-img", "convert", "-t", "unsafe", "-O", "raw", src, dst),
                      prepare=cleanup, after=cleanup, check=copy_check),
        ]
    rows = b.rounds("bulk", cs)
    remove(src)

    out = [f"Source: {size / GiB:g} GiB apparent, {data / MiB:.0f} MiB of random data written "
           f"as {data // EXTENT} extents of 4 MiB at random 4 MiB slots "
           f"(blockmirror.cli.demo.make_demo_image; neighbours merge, so SEEK_DATA sees "
           f"{len(extents)} runs), page-cached. {b.reps} rounds, median wall seconds.\n"]
    for kind, base_label in (("durable", "nbdcopy --flush"), ("cached", "nbdcopy")):
        base = rows.get(base_label)
        dd = next((r for r in rows.values() if r.label.startswith("dd ")), None)
        lines = []
        for r in rows.values():
            if r.kind != kind:
                continue
            cells = [r.label, fmt_s(r.median), spread(r),
                     f"{data / r.median / MiB:.0f}",
                     fmt_ratio(r.median, base.median) if base else "n/a"]
            if kind == "durable":
                cells.append(fmt_ratio(r.median, dd.median) if dd else "n/a")
            extra = ", ".join(f"{k} {fmt_s(r.extra_median(k))}" for k in r.extra)
            if r.problems:
                extra += (", " if extra else "") + "PROBLEM: " + "; ".join(r.problems)
            cells.append(extra)
            lines.append(cells)
        header = ["what", "median s", "min-max", "data MiB/s", f"÷ {base_label}"]
        if kind == "durable":
            header.append("÷ dd")
        header.append("notes")
        out.append(f"**{kind.upper()}**" + (" (the copy is on stable storage when the "
                   "command returns)" if kind == "durable" else " (no fsync: the copy may "
                   "still be in the page cache)") + "\n")
        out.append(table(header, lines) + "\n")
    out.append(bulk_verdicts(rows, workers))
    return "\n".join(out)


def bulk_verdicts(rows: dict[str, Row], workers: int) -> str:
    """Issue 11's targets, from this run: durable sync <= 1.0x nbdcopy --flush
    and <= 1.0x cp && sync; the cached copy <= 0.9x the fastest cached peer."""
    out = []
    # The target is the command's: interpreter, imports and exit included,
    # as a user (and every peer) pays them. The in-process call is shown for
    # what the copy itself costs.
    sync_row = rows[SYNC_COMMAND]
    inner = rows[SYNC_IN_PROCESS]
    for peer, limit in (("nbdcopy --flush", 1.0), ("cp --sparse=always && sync DST", 1.0)):
        if peer in rows:
            ratio = sync_row.median / rows[peer].median
            verdict = "MET" if ratio <= limit else "MISSED"
            out.append(f"- durable: `blockmirror sync` command {fmt_s(sync_row.median)} s = "
                       f"{ratio:.2f}x {peer} (target ≤ {limit:.1f}x): **{verdict}** "
                       f"(in-process call {fmt_s(inner.median)} s = "
                       f"{inner.median / rows[peer].median:.2f}x)")
    for label, row in rows.items():
        if label.startswith(SYNC_BASELINE) and "nbdcopy --flush" in rows:
            peer = rows["nbdcopy --flush"].median
            out.append(f"- baseline ({label[len(SYNC_BASELINE):].strip()}): the command "
                       f"{fmt_s(row.median)} s = {row.median / peer:.2f}x nbdcopy --flush, "
                       f"this tree's {sync_row.median / row.median:.2f}x the baseline's")
    cop = rows.get(f"Copier ({workers} workers), no fsync")
    peers = [r for r in rows.values() if r.kind == "cached" and not r.label.startswith("Copier")]
    if cop is not None and peers:
        best = min(peers, key=lambda r: r.median)
        ratio = cop.median / best.median
        out.append(f"- cached: Copier {fmt_s(cop.median)} s = {ratio:.2f}x {best.label}, the "
                   f"fastest peer (target ≤ 0.9x): **{'MET' if ratio <= 0.9 else 'MISSED'}**")
    return "\n".join(out) + "\n"


# -- 1 TiB -------------------------------------------------------------------------


def section_tib(b: Bench, d: Path, reps: int) -> str:
    size, extents = 1 * TiB, 16
    plain, tracked = d / "tib-src.img", d / "tib-tracked.img"
    dst = d / "tib-dst.img"
    b.log("tib: making two 1 TiB sparse images with 64 MiB of data ...")
    write_random_extents(plain, size, extents, seed=11)
    write_random_extents(tracked, size, extents, seed=11)
    Tracker.create(tracked).close()
    warm(plain, tracked)
    figures: dict[str, list[float]] = {}

    def sync_run(src: Path) -> Callable[[], dict[str, float]]:
        def go() -> dict[str, float]:
            res = bm_sync(src, dst)
            return {"bulk pass s": res.passes[0].seconds}
        return go

    def inspect(src: Path) -> Callable[[], str | None]:
        def go() -> str | None:
            figures.setdefault("copy allocated MiB", []).append(allocated(dst) / MiB)
            if os.path.exists(manifest_path(str(dst))):
                figures.setdefault("manifest allocated MiB", []).append(
                    allocated(manifest_path(str(dst))) / MiB)
            if allocated(dst) > extents * EXTENT + MiB:
                return f"copy not sparse: {allocated(dst) / MiB:.0f} MiB allocated"
            if not identical(src, dst):
                return "copy differs from the source"
            return None
        return go

    def tool_then_fsync(*argv: str | os.PathLike[str]) -> Callable[[], None]:
        def go() -> None:
            run(*argv)
            run("sync", dst)
        return go

    cleanup = lambda: remove_copy(dst)  # noqa: E731
    cs = [
        Contender("blockmirror sync, untracked source", "durable", sync_run(plain),
                  prepare=cleanup, after=cleanup, check=inspect(plain)),
        Contender("blockmirror sync, tracked source (sidecar)", "durable", sync_run(tracked),
                  prepare=cleanup, after=cleanup, check=inspect(tracked)),
    ]
    if have("nbdcopy"):
        cs.append(Contender("nbdcopy --flush", "durable",
                            cmd("nbdcopy", "--flush", plain, dst),
                            prepare=cleanup, after=cleanup, check=inspect(plain)))
    cs.append(Contender("cp --sparse=always && sync DST", "durable",
                        tool_then_fsync("cp", "--sparse=always", plain, dst),
                        prepare=cleanup, after=cleanup, check=inspect(plain)))
    if have("qemu-img"):
        cs.append(Contender("qemu-img convert -O raw && sync DST", "durable",
                            tool_then_fsync("qemu-img", "convert", "-O", "raw", plain, dst),
                            prepare=cleanup, after=cleanup, check=inspect(plain)))
    rows = b.rounds("tib", cs, reps=reps)
    remove_copy(plain)
    remove_copy(tracked)
    lines = []
    for r in rows.values():
        note = ", ".join(f"{k} {fmt_s(r.extra_median(k))}" for k in r.extra)
        if r.problems:
            note += " PROBLEM: " + "; ".join(r.problems)
        target = ""
        cp_row = rows.get("cp --sparse=always && sync DST")
        if r.label.startswith("blockmirror") and cp_row is not None:
            ratio = r.median / cp_row.median
            target = f"{'MET' if ratio <= 1.5 else 'MISSED'} ({ratio:.2f}x)"
        lines.append([r.label, fmt_s(r.median), spread(r), target, note])
    out = [f"1 TiB apparent, 64 MiB of random data in 16 extents of 4 MiB; durable; "
           f"{reps} rounds. Target (issue 11): ≤ 1.5x `cp --sparse=always && sync DST` "
           "(peak RSS: see bench/scaling.py).\n",
           table(["what", "median s", "min-max", "target ≤ 1.5x cp", "notes"], lines), ""]
    for k, v in figures.items():
        out.append(f"- {k} after a copy (any tool): {min(v):.0f}-{max(v):.0f}")
    return "\n".join(out) + "\n"


# -- dirty pass --------------------------------------------------------------------


def section_dirty(b: Bench, d: Path, reps: int, dirty_mib: list[int], workers: int) -> str:
    sizes = {"1 GiB": 1 * GiB, "1 TiB": 1 * TiB}
    results: dict[tuple[str, int], dict[str, list[float]]] = {}
    for name, size in sizes.items():
        src, dst = d / f"dirty-{size}.img", d / f"dirty-{size}.dst"
        for p in (src, dst):
            with open(p, "wb") as f:
                f.truncate(size)
        Tracker.create(src, granularity=GRANULE).close()
        image = TrackedImage(src)
        tracker = Tracker.open(src)
        sfd = os.open(src, os.O_RDONLY)
        dfd = os.open(dst, os.O_RDWR)
        rng = np.random.default_rng(5)
        granules = size // GRANULE
        payload = rng.bytes(GRANULE)
        try:
            with Copier(sfd, dfd, workers=workers, src_path=str(src)) as copier:
                for r in range(reps):
                    for n in dirty_mib:
                        count = n * MiB // GRANULE
                        picks = rng.choice(granules, count, replace=False) if count else []
                        tracker.fetch_and_clear_array()  # start from a clean bitmap
                        for g in np.sort(np.asarray(picks, dtype=np.int64)).tolist():
                            image.pwrite(payload, g * GRANULE)
                        os.sync()
                        t0 = time.perf_counter()
                        extents = tracker.fetch_and_clear_array()
                        t1 = time.perf_counter()
                        stats = copier.copy_extents(extents, dst_fresh=False)
                        t2 = time.perf_counter()
                        if stats.bytes_read != count * GRANULE:
                            raise RuntimeError(f"dirty pass copied {stats.bytes_read} bytes, "
                                               f"expected {count * GRANULE}")
                        res = results.setdefault((name, n), {})
                        res.setdefault("fetch", []).append(t1 - t0)
                        res.setdefault("copy", []).append(t2 - t1)
                        res.setdefault("total", []).append(t2 - t0)
                        res.setdefault("extents", []).append(len(extents))
                        b.log(f"  [dirty {r + 1}/{reps}] {name} {n:>4} MiB dirty: fetch "
                              f"{fmt_s(t1 - t0)}, copy {fmt_s(t2 - t1)}")
        finally:
            os.close(sfd)
            os.close(dfd)
            tracker.close()
            image.close()
            remove_copy(src)
            remove(dst)
    lines = []
    for n in dirty_mib:
        small, big = results[("1 GiB", n)], results[("1 TiB", n)]
        med = {k: {s: statistics.median(v[k]) for s, v in (("1 GiB", small), ("1 TiB", big))}
               for k in ("fetch", "copy", "total")}
        lines.append([
            f"{n} MiB", f"{statistics.median(small['extents']):.0f}",
            fmt_s(med["fetch"]["1 GiB"]), fmt_s(med["copy"]["1 GiB"]), fmt_s(med["total"]["1 GiB"]),
            fmt_s(med["fetch"]["1 TiB"]), fmt_s(med["copy"]["1 TiB"]), fmt_s(med["total"]["1 TiB"]),
            fmt_ratio(med["total"]["1 TiB"], med["total"]["1 GiB"]),
        ])
    return (f"Dirty pass = `Tracker.fetch_and_clear_array()` + `Copier.copy_extents(..., "
            f"dst_fresh=False)` ({workers} workers) of N MiB in scattered 64 KiB granules "
            f"written through `TrackedImage`; cached (no fsync); {reps} rounds, medians.\n\n"
            + table(["dirty", "extents", "1 GiB: fetch", "copy", "total",
                     "1 TiB: fetch", "copy", "total", "total 1 TiB ÷ 1 GiB"], lines) + "\n")


# -- incremental -------------------------------------------------------------------


def section_incremental(b: Bench, d: Path, size: int, reps: int, fraction: float,
                        keep_pair: bool) -> tuple[str, tuple[Path, Path] | None]:
    src = d / "incr-src.img"
    inc, resync, full, rs = (d / f"incr-{n}.img" for n in ("incremental", "resync", "full",
                                                            "rsync"))
    b.log(f"incremental: writing {size / GiB:g} GiB of random data and four copies ...")
    write_full_random(src, size, seed=3)
    Tracker.create(src, granularity=GRANULE).close()
    for copy in (inc, resync, full):
        bm_sync(src, copy)
    run("cp", "--sparse=always", src, rs)
    os.sync()
    blocks = size // GRANULE
    changed = max(1, int(blocks * fraction))
    rng = np.random.default_rng(9)
    change_log: list[float] = []

    def change(r: int) -> None:
        picks = np.sort(rng.choice(blocks, changed, replace=False)).tolist()
        t0 = time.perf_counter()
        with TrackedImage(src) as image:
            for g in picks:
                image.pwrite(rng.bytes(GRANULE), g * GRANULE)
        change_log.append(time.perf_counter() - t0)
        os.sync()
        b.log(f"  [incremental {r + 1}/{reps}] rewrote {changed} blocks "
              f"({changed * GRANULE / MiB:.0f} MiB) through TrackedImage")

    def result_figures(res: SyncResult) -> dict[str, float]:
        return {"MiB copied": res.bytes_copied / MiB}

    def mark_mid_update() -> None:
        # As if the previous update of this copy had died halfway: its change
        # id can't be trusted, so sync falls back to a hash resync.
        m = Manifest.open(manifest_path(str(resync)))
        m.begin_update()
        m.close()

    def rsync_run() -> dict[str, float]:
        t0 = time.perf_counter()
        # -I: without it rsync's quick check (same size; mtimes aren't kept
        # without -t) skips the changed image and leaves the copy stale.
        run("rsync", "--inplace", "--no-whole-file", "-I", src, rs)
        t1 = time.perf_counter()
        run("sync", rs)
        return {"rsync alone s (cached)": t1 - t0}

    def same(dst: Path) -> Callable[[], str | None]:
        return lambda: None if identical(src, dst) else f"{dst.name} differs from the source"

    cs = [
        Contender("blockmirror sync, incremental (change id)", "durable",
                  lambda: result_figures(bm_sync(src, inc)), check=same(inc),
                  check_every_round=True),
        Contender("blockmirror sync, hash resync (change id not trusted)", "durable",
                  lambda: result_figures(bm_sync(src, resync)), prepare=mark_mid_update,
                  check=same(resync), check_every_round=True),
        Contender("blockmirror sync --force (full copy)", "durable",
                  lambda: result_figures(bm_sync(src, full, force=True)), check=same(full),
                  check_every_round=True),
    ]
    if have("rsync"):
        cs.append(Contender("rsync --inplace --no-whole-file -I && sync DST", "durable",
                            rsync_run, check=same(rs), check_every_round=True))
    rows = b.rounds("incremental", cs, reps=reps, between=change)
    base = rows.get("rsync --inplace --no-whole-file -I && sync DST")
    fullrow = rows["blockmirror sync --force (full copy)"]
    lines = []
    for r in rows.values():
        note = ", ".join(f"{k} {r.extra_median(k):.1f}" if "MiB" in k else
                         f"{k} {fmt_s(r.extra_median(k))}" for k in r.extra)
        if r.problems:
            note += " PROBLEM: " + "; ".join(r.problems)
        lines.append([r.label, fmt_s(r.median), spread(r), fmt_ratio(r.median, fullrow.median),
                      fmt_ratio(r.median, base.median) if base else "n/a", note])
    if base is not None:
        cached = base.extra_median("rsync alone s (cached)")
        inc_row = rows["blockmirror sync, incremental (change id)"]
        lines.append(["rsync --inplace --no-whole-file -I alone (cached, no fsync)", fmt_s(cached),
                      "", fmt_ratio(cached, fullrow.median), fmt_ratio(cached, base.median),
                      f"incremental sync ÷ this: {fmt_ratio(inc_row.median, cached)}"])
    text = (f"{size / GiB:g} GiB image, every byte random data (allocated), tracked at 64 KiB; "
            f"each round rewrites {fraction:.0%} of its 64 KiB blocks ({changed} blocks, "
            f"{changed * GRANULE / MiB:.0f} MiB, through `TrackedImage`, median "
            f"{fmt_s(statistics.median(change_log))}), then each earlier copy is brought up "
            f"to date; page-cached source; {reps} rounds.\n\n"
            + table(["what", "median s", "min-max", "÷ full sync", "÷ rsync + sync",
                     "notes"], lines) + "\n")
    for p in (resync, full):
        remove_copy(p)
    remove_copy(rs)
    if keep_pair:
        return text, (src, inc)
    remove_copy(src)
    remove_copy(inc)
    return text, None


# -- verify ------------------------------------------------------------------------


def python_compare_files(path_a: str, path_b: str, block: int = 65536,
                         workers: int = 4) -> list[tuple[int, int]]:
    """verify.compare_files as it was before the C kernel (commit dc25c86):
    4 MiB ``os.pread`` into fresh bytes on a thread pool, ``==`` under the GIL.
    Kept here as the before-and-after baseline."""
    from concurrent.futures import ThreadPoolExecutor

    chunk_bytes = 4 << 20
    fa, fb = os.open(path_a, os.O_RDONLY), os.open(path_b, os.O_RDONLY)
    try:
        size = min(os.fstat(fa).st_size, os.fstat(fb).st_size)
        regions = sorted(set(pairs(data_extents(fa, size))) | set(pairs(data_extents(fb, size))))
        chunks = sorted({(pos, min(chunk_bytes, off + length - pos))
                         for off, length in regions
                         for pos in range(off - off % block, off + length, chunk_bytes)})

        def one(chunk: tuple[int, int]) -> list[tuple[int, int]]:
            off, length = chunk
            a, b = os.pread(fa, length, off), os.pread(fb, length, off)
            if a == b:
                return []
            return [(off + rel, min(block, length - rel)) for rel in range(0, length, block)
                    if a[rel:rel + block] != b[rel:rel + block]]

        with ThreadPoolExecutor(workers) as pool:
            return [d for diffs in pool.map(one, chunks) for d in diffs]
    finally:
        os.close(fa)
        os.close(fb)


def section_verify(b: Bench, pairs: dict[str, tuple[Path, Path]], reps: int) -> str:
    out = []
    for name, (a, c) in pairs.items():
        warm(a, c)
        size = os.path.getsize(a)
        data = max(allocated(a), allocated(c))

        def bm_cli(x: Path = a, y: Path = c) -> None:
            run(*blockmirror_argv("verify", x, y))

        def in_process(x: Path = a, y: Path = c) -> None:
            if compare_files(str(x), str(y)):
                raise RuntimeError("compare_files found differences in identical images")

        def before(x: Path = a, y: Path = c) -> None:
            if python_compare_files(str(x), str(y)):
                raise RuntimeError("the Python loop found differences in identical images")

        cs = [
            Contender("verify.compare_files (in-process)", "", in_process),
            Contender("  the Python loop verify.py had before (in-process)", "", before),
            Contender("blockmirror verify A B (command)", "", bm_cli),
            Contender("python -c 'import blockmirror.cli' (the command's start-up)", "",
                      cmd(sys.executable, "-c", "import blockmirror.cli")),
            Contender("cmp A B", "", cmd("cmp", a, c)),
        ]
        if have("qemu-img"):
            cs.append(Contender("qemu-img compare -f raw -F raw A B", "",
                                cmd("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", a, c)))
        rows = b.rounds(f"verify {name}", cs, reps=reps)
        cmp_row = rows["cmp A B"]
        q = rows.get("qemu-img compare -f raw -F raw A B")
        lines = [[r.label, fmt_s(r.median), spread(r), f"{size / r.median / GiB:.2f}",
                  fmt_ratio(r.median, cmp_row.median),
                  fmt_ratio(r.median, q.median) if q else "n/a"] for r in rows.values()]
        out.append(f"**{name}**: {size / GiB:g} GiB apparent, {data / MiB:.0f} MiB allocated "
                   f"each, identical, page-cached; {reps} rounds.\n")
        out.append(table(["what", "median s", "min-max", "GiB/s (apparent)", "÷ cmp",
                          "÷ qemu-img compare"], lines) + "\n")
        for label in ("verify.compare_files (in-process)", "blockmirror verify A B (command)"):
            r = rows[label]
            met = r.median < cmp_row.median and (q is None or r.median < q.median)
            out.append(f"- target faster than cmp and qemu-img compare, {label}: "
                       f"**{'MET' if met else 'MISSED'}**")
        out.append("")
    return "\n".join(out)


# -- startup -----------------------------------------------------------------------


def section_startup(b: Bench, d: Path, reps: int) -> str:
    """The light commands against the C tools they are compared with."""
    env = python_env(d)
    pairs_: dict[str, tuple[Path, Path]] = {}
    for name, size, data in (("sparse 1 GiB / 1 MiB", GiB, MiB),
                             ("4 GiB / 64 MiB", 4 * GiB, 64 * MiB)):
        a, c = d / f"start-{size}-a.img", d / f"start-{size}-b.img"
        if data >= EXTENT:
            write_random_extents(a, size, data // EXTENT, seed=11)
        else:  # one small extent a third of the way in
            with open(a, "wb") as f:
                f.truncate(size)
                f.seek(size // 3)
                f.write(random.Random(11).randbytes(data))
        run("cp", "--sparse=always", a, c)
        pairs_[name] = (a, c)
    status_img = pairs_["sparse 1 GiB / 1 MiB"][0]
    bm = blockmirror_argv()
    subprocess.run([*bm, "track", "enable", str(status_img)], check=True, env=env,
                   stdout=subprocess.DEVNULL, cwd=REPO)

    def command(*argv: str | os.PathLike[str], ok: tuple[int, ...] = (0,)) -> Callable[[], None]:
        def go() -> None:
            proc = subprocess.run([os.fspath(x) for x in argv], env=env, cwd=REPO,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if proc.returncode not in ok:
                raise RuntimeError(f"{' '.join(map(str, argv))} exited {proc.returncode}")
        return go

    cs = [Contender("python -c pass (the interpreter here)", "", command(sys.executable, "-c",
                                                                         "pass")),
          Contender("python -I -S -c pass (no site)", "", command(sys.executable, "-I", "-S",
                                                                  "-c", "pass")),
          Contender("blockmirror --help", "", command(*bm, "--help")),
          Contender("blockmirror track status IMG", "", command(*bm, "track", "status",
                                                                status_img)),
          Contender("qemu-img info IMG", "", command("qemu-img", "info", "-f", "raw",
                                                     status_img))]
    for name, (a, c) in pairs_.items():
        cs.append(Contender(f"blockmirror verify A B, {name}", "", command(*bm, "verify", a, c)))
        cs.append(Contender(f"qemu-img compare A B, {name}", "",
                            command("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw",
                                    a, c)))
    if not have("qemu-img"):
        cs = [x for x in cs if not x.label.startswith("qemu-img")]
    for x in cs:  # warm: bytecode compiled, images in the page cache
        x.run()
    rows = b.rounds("startup", cs, reps=reps)
    lines = [[r.label, fmt_s(r.median), spread(r)] for r in rows.values()]
    out = [f"Each command run as its own process, {reps} interleaved rounds, page-cached "
           "images, compiled bytecode.\n", table(["what", "median s", "min-max"], lines), ""]
    for mine, peer in [(f"blockmirror verify A B, {n}", f"qemu-img compare A B, {n}")
                       for n in pairs_] + [("blockmirror track status IMG", "qemu-img info IMG")]:
        if peer in rows:
            ratio = rows[mine].median / rows[peer].median
            out.append(f"- {mine} ≤ {peer}: {ratio:.2f}x, "
                       f"**{'MET' if ratio <= 1.0 else 'MISSED'}**")
    floor = rows["python -c pass (the interpreter here)"].median
    out.append(f"- the same above the interpreter's own start ({fmt_s(floor)}): verify "
               + ", ".join(f"{n} +{fmt_s(rows[f'blockmirror verify A B, {n}'].median - floor)}"
                           for n in pairs_)
               + f"; track status +{fmt_s(rows['blockmirror track status IMG'].median - floor)}")
    for a, c in pairs_.values():
        remove_copy(a)
        remove_copy(c)
    return "\n".join(out)


# -- main --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(SECTIONS),
                   help=f"comma-separated sections of {','.join(SECTIONS)} (default: all)")
    p.add_argument("--size", default="4G", help="bulk: apparent size (default 4G)")
    p.add_argument("--data", default="1G", help="bulk: data in 4 MiB extents (default 1G)")
    p.add_argument("--reps", type=int, default=5, help="rounds for bulk and verify (default 5)")
    p.add_argument("--tib-reps", type=int, default=5, help="rounds for tib (default 5)")
    p.add_argument("--dirty-reps", type=int, default=5, help="rounds for dirty (default 5)")
    p.add_argument("--startup-reps", type=int, default=21,
                   help="rounds for startup (default 21)")
    p.add_argument("--dirty-mib", default="0,4,16,64",
                   help="dirty: MiB dirty per pass, comma-separated (default 0,4,16,64)")
    p.add_argument("--incr-size", default="4G", help="incremental: image size (default 4G)")
    p.add_argument("--incr-reps", type=int, default=3, help="incremental rounds (default 3)")
    p.add_argument("--incr-fraction", type=float, default=0.01,
                   help="incremental: fraction of 64 KiB blocks rewritten (default 0.01)")
    p.add_argument("--workers", type=int, default=4, help="Copier workers (sync's default 4)")
    p.add_argument("--baseline-tree", metavar="DIR",
                   help="bulk: also run the sync command of another checkout (built in "
                   "place), interleaved in the same rounds: before/after in one run")
    p.add_argument("--dir", help="where the big files go (default: a new folder in $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep the working folder")
    p.add_argument("--json", help="also write every timing to this file")
    p.add_argument("--quiet", action="store_true", help="no per-run log on stderr")
    args = p.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    for s in only:
        if s not in SECTIONS:
            p.error(f"unknown section {s!r}")
    made = args.dir is None
    d = Path(args.dir or tempfile.mkdtemp(prefix="bm-compare-"))
    d.mkdir(parents=True, exist_ok=True)
    log = (lambda line: None) if args.quiet else (lambda line: print(line, file=sys.stderr,
                                                                    flush=True))
    b = Bench(args.reps, log)
    size, data = parse_size(args.size), parse_size(args.data)
    started = datetime.datetime.now().astimezone()
    report = [f"# blockmirror vs peers — {started:%Y-%m-%d %H:%M %Z}",
              f"{platform.node()} · Linux {platform.release()} · Python "
              f"{platform.python_version()} · {os.cpu_count()} CPUs · working folder {d} · "
              f"`{' '.join(['python', 'bench/compare_tools.py', *(argv or sys.argv[1:])])}`\n"]
    try:
        verify_pairs: dict[str, tuple[Path, Path]] = {}
        if "bulk" in only:
            baseline = Path(args.baseline_tree).resolve() if args.baseline_tree else None
            report += ["## Bulk pass (issue 3)\n", section_bulk(b, d, size, data, args.workers,
                                                                baseline)]
        if "tib" in only:
            report += ["## 1 TiB apparent, 64 MiB of data (issue 3)\n",
                       section_tib(b, d, args.tib_reps)]
        if "dirty" in only:
            mibs = [int(x) for x in args.dirty_mib.split(",") if x.strip()]
            report += ["## Dirty pass: time follows dirty bytes, not image size (issue 3)\n",
                       section_dirty(b, d, args.dirty_reps, mibs, args.workers)]
        if "incremental" in only:
            text, pair = section_incremental(b, d, parse_size(args.incr_size), args.incr_reps,
                                             args.incr_fraction, keep_pair="verify" in only)
            report += ["## Incremental sync (issue 5)\n", text]
            if pair:
                verify_pairs["fully written pair"] = pair
        if "verify" in only:
            if not verify_pairs:
                a, c = d / "verify-a.img", d / "verify-b.img"
                b.log(f"verify: writing two identical {args.incr_size} images ...")
                write_full_random(a, parse_size(args.incr_size), seed=3)
                run("cp", a, c)
                verify_pairs["fully written pair"] = (a, c)
            sa, sc = d / "verify-sparse-a.img", d / "verify-sparse-b.img"
            make_demo_image(str(sa), size, data_fraction=data / size, seed=7)
            run("cp", "--sparse=always", sa, sc)
            verify_pairs["sparse pair"] = (sa, sc)
            report += ["## Verify throughput (issue 5)\n", section_verify(b, verify_pairs,
                                                                          args.reps)]
            for pa, pc in verify_pairs.values():
                remove_copy(pa)
                remove_copy(pc)
        if "startup" in only:
            report += ["## Start-up of the light commands (issue 11)\n",
                       section_startup(b, d, args.startup_reps)]
    finally:
        if made and not args.keep:
            shutil.rmtree(d, ignore_errors=True)
    print("\n".join(report))
    if args.json:
        dump: dict[str, Any] = {
            "started": started.isoformat(), "argv": argv or sys.argv[1:],
            "rows": {sec: {lab: {"kind": r.kind, "times": r.times, "extra": r.extra,
                                 "problems": r.problems} for lab, r in rows.items()}
                     for sec, rows in b.rows.items()},
        }
        Path(args.json).write_text(json.dumps(dump, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
