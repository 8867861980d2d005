"""Backup benchmarks (issue 5, "Measure it") in the one-command suite.

Smaller than the full comparison (``python bench/compare_tools.py``, whose
4 GiB figures are in bench/README.md) so the suite stays quick:

- incremental sync of a 512 MiB fully written, tracked image after 1 % of its
  64 KiB blocks were rewritten through ``TrackedImage`` (untimed, before each
  round), against a full ``sync --force`` and ``rsync --inplace
  --no-whole-file -I && sync DST`` (baseline) onto an earlier copy; all
  durable. Each contender first catches its copy up (untimed), so every
  round sees exactly one round's changes;
- verify throughput on identical, page-cached 1 GiB images (every byte
  read): ``verify.compare_files`` and the ``blockmirror verify`` command
  against ``qemu-img compare`` (baseline; target: faster) and ``cmp``.

Run: ``python -m pytest bench -q --benchmark-only`` (see bench/README.md).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_tools as ct  # bench/ is not a package: imported by path

from blockmirror import TrackedImage, Tracker
from blockmirror.copying.verify import compare_files
from blockmirror.migration import sync as bm_sync

MiB, GiB = 1 << 20, 1 << 30
GRANULE = 64 * 1024
INCR_SIZE = 512 * MiB
CHANGED = 0.01
VERIFY_SIZE = 1 * GiB
ROUNDS = 5


@dataclass
class Tracked:
    src: Path
    rng: np.random.Generator

    def rewrite_one_percent(self) -> None:
        blocks = INCR_SIZE // GRANULE
        picks = np.sort(self.rng.choice(blocks, int(blocks * CHANGED), replace=False))
        with TrackedImage(self.src) as image:
            for g in picks.tolist():
                image.pwrite(self.rng.bytes(GRANULE), g * GRANULE)
        os.sync()


@pytest.fixture(scope="module")
def tracked(bench_dir: Path) -> Iterator[Tracked]:
    src = bench_dir / "incr-src.img"
    ct.write_full_random(src, INCR_SIZE, seed=3)
    Tracker.create(src, granularity=GRANULE).close()
    yield Tracked(src, np.random.default_rng(9))
    ct.remove_copy(src)


# variant: (label, tool needed, baseline)
INCREMENTAL = {
    "incremental": ("blockmirror.sync, incremental (change id)", None, "incr-rsync"),
    "full": ("blockmirror.sync --force (full copy)", None, "incr-rsync"),
    "rsync": ("rsync --inplace --no-whole-file -I && sync DST (baseline)", "rsync", None),
}


@pytest.mark.parametrize("variant", list(INCREMENTAL))
def test_incremental(benchmark, report, tracked: Tracked, bench_dir: Path, variant: str) -> None:
    label, tool, baseline = INCREMENTAL[variant]
    if tool and not shutil.which(tool):
        pytest.skip(f"{tool} not installed")
    src, dst = tracked.src, bench_dir / f"incr-{variant}.img"
    runs: dict[str, Callable[[], object]] = {
        "incremental": lambda: bm_sync(src, dst),
        "full": lambda: bm_sync(src, dst, force=True),
        # -I: rsync's quick check (same size; mtimes not kept without -t)
        # would otherwise skip the changed image.
        "rsync": lambda: (ct.run("rsync", "--inplace", "--no-whole-file", "-I", src, dst),
                          ct.run("sync", dst)),
    }
    # The earlier copy, caught up with the source (untimed).
    if variant == "rsync":
        ct.run("cp", "--sparse=always", src, dst)
    else:
        bm_sync(src, dst)
    benchmark.group = (f"incremental sync, {INCR_SIZE // MiB} MiB image, "
                       f"{CHANGED:.0%} of 64 KiB blocks changed, durable")
    benchmark.pedantic(runs[variant], setup=tracked.rewrite_one_percent, rounds=ROUNDS,
                       iterations=1)
    assert ct.identical(src, dst), f"{variant}: copy differs from the source"
    ct.remove_copy(dst)
    report(benchmark, f"incr-{variant}", label, baseline=baseline)


@pytest.fixture(scope="module")
def identical_pair(bench_dir: Path) -> Iterator[tuple[Path, Path]]:
    a, b = bench_dir / "verify-a.img", bench_dir / "verify-b.img"
    ct.write_full_random(a, VERIFY_SIZE, seed=5)
    ct.run("cp", a, b)
    ct.warm(a, b)
    yield a, b
    ct.remove(a, b)


# variant: (label, tool needed, baseline, target ratio)
VERIFY = {
    "compare_files": ("verify.compare_files, in-process", None, "verify-qemu-img", 1.0),
    "command": ("blockmirror verify A B (command, incl. start-up)", None, "verify-qemu-img",
                None),
    "qemu-img": ("qemu-img compare -f raw -F raw (baseline)", "qemu-img", None, None),
    "cmp": ("cmp A B", "cmp", "verify-qemu-img", None),
}


@pytest.mark.parametrize("variant", list(VERIFY))
def test_verify(benchmark, report, identical_pair: tuple[Path, Path], variant: str) -> None:
    label, tool, baseline, target = VERIFY[variant]
    if tool and not shutil.which(tool):
        pytest.skip(f"{tool} not installed")
    a, b = identical_pair

    def in_process() -> None:
        assert compare_files(str(a), str(b)) == []

    runs: dict[str, Callable[[], object]] = {
        "compare_files": in_process,
        "command": ct.cmd(sys.executable, "-m", "blockmirror", "verify", a, b),
        "qemu-img": ct.cmd("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", a, b),
        "cmp": ct.cmd("cmp", a, b),
    }
    benchmark.group = f"verify, identical page-cached {VERIFY_SIZE // GiB} GiB images"
    benchmark.pedantic(runs[variant], rounds=ROUNDS, iterations=1, warmup_rounds=1)
    report(benchmark, f"verify-{variant}", label, baseline=baseline, target_ratio=target)
