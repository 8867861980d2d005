"""Sync benchmarks (issue 3, "Measure it") in the one-command suite.

Smaller than the full comparison so the suite stays quick: a 1 GiB image with
256 MiB of random data in 4 MiB extents, and the 1 TiB / 64 MiB case. The
4 GiB / 1 GiB figures with every peer, the dirty-pass series and the tables
in bench/README.md come from ``python bench/compare_tools.py``.

- bulk pass, DURABLE (the copy is on stable storage when the call returns):
  ``blockmirror.sync`` of an untracked image (bulk pass, fsync, rename,
  manifest) and a ``Copier`` + fsync against ``nbdcopy --flush`` (baseline;
  target: sync faster), ``cp --sparse=always && sync DST`` and ``dd
  conv=fsync`` of as many bytes (the disk's sequential-write limit);
- bulk pass, CACHED (no fsync): ``Copier`` against ``nbdcopy`` (baseline;
  target: faster) and ``cp --sparse=always``;
- ``blockmirror.sync`` of 1 TiB apparent holding 64 MiB (target < 1 s; the
  copy must stay sparse).

Each round starts from no destination and an ``os.sync()`` (untimed), so no
earlier round's writeback competes; the source stays in the page cache.

Run: ``python -m pytest bench -q --benchmark-only`` (see bench/README.md).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_tools as ct  # bench/ is not a package: imported by path

from blockmirror.cli.demo import make_demo_image
from blockmirror.migration import sync as bm_sync

MiB, GiB, TiB = 1 << 20, 1 << 30, 1 << 40
BULK_SIZE = 1 * GiB
BULK_DATA = 256 * MiB
ROUNDS = 5


@pytest.fixture(scope="module")
def bulk_image(bench_dir: Path) -> Iterator[Path]:
    path = bench_dir / "bulk-src.img"
    make_demo_image(str(path), BULK_SIZE, data_fraction=BULK_DATA / BULK_SIZE, seed=7)
    ct.warm(path)
    yield path
    ct.remove(path)


def _copier(src: Path, dst: Path, *, fsync: bool, writeback: bool) -> Callable[[], None]:
    def run() -> None:
        ct.copier_copy(src, dst, fsync=fsync, writeback=writeback)
    return run


def _then_sync(*argv: str | os.PathLike[str]) -> Callable[[], None]:
    dst = argv[-1]

    def run() -> None:
        ct.run(*argv)
        ct.run("sync", dst)
    return run


# variant: (durable?, label, tool needed, baseline variant, target ratio)
BULK = {
    "sync": (True, "blockmirror.sync, untracked: bulk, fsync, rename, manifest", None,
             "nbdcopy-flush", 1.0),
    "copier-fsync": (True, "  Copier + start_writeback + fsync", None, "nbdcopy-flush", None),
    "copier-fsync-nohint": (True, "  Copier + fsync, no writeback hint", None, "nbdcopy-flush",
                            None),
    "nbdcopy-flush": (True, "nbdcopy --flush (baseline)", "nbdcopy", None, None),
    "cp-sync": (True, "cp --sparse=always && sync DST", "cp", "nbdcopy-flush", None),
    "dd": (True, "dd if=/dev/zero bs=4M conv=fsync, same bytes (disk limit)", "dd",
           "nbdcopy-flush", None),
    "copier": (False, "Copier, no fsync", None, "nbdcopy", 1.0),
    "nbdcopy": (False, "nbdcopy (baseline)", "nbdcopy", None, None),
    "cp": (False, "cp --sparse=always", "cp", "nbdcopy", None),
}


@pytest.mark.parametrize("variant", list(BULK))
def test_bulk(benchmark, report, bulk_image: Path, bench_dir: Path, variant: str) -> None:
    durable, label, tool, baseline, target = BULK[variant]
    if tool and not shutil.which(tool):
        pytest.skip(f"{tool} not installed")
    src, dst = bulk_image, bench_dir / "bulk-dst.img"
    runs: dict[str, Callable[[], object]] = {
        "sync": lambda: bm_sync(src, dst),
        "copier-fsync": _copier(src, dst, fsync=True, writeback=True),
        "copier-fsync-nohint": _copier(src, dst, fsync=True, writeback=False),
        "nbdcopy-flush": ct.cmd("nbdcopy", "--flush", src, dst),
        "cp-sync": _then_sync("cp", "--sparse=always", src, dst),
        "dd": ct.cmd("dd", "if=/dev/zero", f"of={dst}", "bs=4M", f"count={BULK_DATA // (4 * MiB)}",
                     "conv=fsync", "status=none"),
        "copier": _copier(src, dst, fsync=False, writeback=False),
        "nbdcopy": ct.cmd("nbdcopy", src, dst),
        "cp": ct.cmd("cp", "--sparse=always", src, dst),
    }

    def fresh() -> None:
        ct.remove_copy(dst)
        os.sync()

    kind = "durable" if durable else "cached (no fsync)"
    benchmark.group = f"bulk pass, {BULK_SIZE // GiB} GiB / {BULK_DATA // MiB} MiB data, {kind}"
    benchmark.pedantic(runs[variant], setup=fresh, rounds=ROUNDS, iterations=1)
    if variant != "dd":
        assert ct.identical(src, dst), f"{variant}: copy differs"
        assert ct.allocated(dst) <= BULK_DATA + 2 * MiB, f"{variant}: copy not sparse"
    ct.remove_copy(dst)
    report(benchmark, f"bulk-{variant}", f"{label} [{'durable' if durable else 'cached'}]",
           baseline=f"bulk-{baseline}" if baseline else None, target_ratio=target)


@pytest.fixture(scope="module")
def tib_image(bench_dir: Path) -> Iterator[Path]:
    path = bench_dir / "tib-src.img"
    ct.write_random_extents(path, TiB, 16, seed=11)
    ct.warm(path)
    yield path
    ct.remove(path)


def test_sync_tib(benchmark, report, tib_image: Path, bench_dir: Path) -> None:
    dst = bench_dir / "tib-dst.img"

    def fresh() -> None:
        ct.remove_copy(dst)
        os.sync()

    benchmark.group = "sync 1 TiB apparent / 64 MiB data, durable"
    benchmark.pedantic(lambda: bm_sync(tib_image, dst), setup=fresh, rounds=ROUNDS,
                       iterations=1)
    assert ct.allocated(dst) <= 65 * MiB, "the 1 TiB copy is not sparse"
    ct.remove_copy(dst)
    report(benchmark, "sync-tib", "blockmirror.sync 1 TiB / 64 MiB [durable]", target_s=1.0)
