"""Micro-benchmarks of the change tracker (issue 2, "Measure it").

Every figure is paired with a baseline timed in the same run:

- ``TrackedImage.pwrite`` against ``os.pwrite`` on the same pre-written file,
  4 KiB and 1 MiB writes cycling over 64 MiB of page cache (target <= 1.10x at
  4 KiB); the cffi fallback of the same write, and a direct cffi call of the C
  function without the Python wrapper, show what the binding layers cost;
- ``Tracker.fetch_and_clear`` / ``fetch_and_clear_array`` over the bitmap of a
  1 TiB sparse image, 64 KiB granules, 0.1 % dirty (target <= 5 ms), against
  the same scan of a clean bitmap; the dirty set is re-marked before each
  round, outside the timing (pedantic mode);
- ``dirty_bytes`` and ``dirty_extents`` (snapshot) over the same bitmap;
- ``Tracker.mark`` per call (target <= 1 µs), against an empty Python method
  call and a C call that does nothing (zero length) as floors.

Run: ``python -m pytest bench -q --benchmark-only`` (see bench/README.md).
"""

from __future__ import annotations

import itertools
import os
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from blockmirror import TrackedImage
from blockmirror._bindings import writer as _writer
from blockmirror._bindings._ffi import lib

MiB = 1 << 20

# -- TrackedImage.pwrite vs os.pwrite ----------------------------------------------

# Writes per round: enough that a round is far above the timer's resolution.
WRITES_PER_ROUND = {4096: 512, MiB: 8}
SIZE_LABEL = {4096: "4 KiB", MiB: "1 MiB"}
PWRITE_TARGET = {4096: 1.10}


@pytest.fixture(scope="module")
def writers(page_cache_image) -> Iterator[dict[str, Any]]:
    image = TrackedImage(page_cache_image.path)
    raw_fd = os.open(page_cache_image.path, os.O_RDWR | os.O_CLOEXEC)
    yield {"image": image, "fd": raw_fd, "region": page_cache_image.size}
    os.close(raw_fd)
    image.close()


def _rounds_of_offsets(size: int, region: int) -> Iterator[list[int]]:
    """Endless rounds of WRITES_PER_ROUND[size] offsets, walking the 64 MiB
    region in order and wrapping around: every variant sees the same pattern."""
    offsets = list(range(0, region, size))
    n = WRITES_PER_ROUND[size]
    batches = [offsets[i : i + n] for i in range(0, len(offsets), n)]
    return itertools.cycle(batches)


def _pwrite_round(variant: str, size: int, w: dict[str, Any]) -> Callable[[], None]:
    data = os.urandom(size)
    rounds = _rounds_of_offsets(size, w["region"])
    if variant == "os":
        pwrite, fd = os.pwrite, w["fd"]

        def run() -> None:
            for off in next(rounds):
                pwrite(fd, data, off)

    elif variant == "tracked":
        tracked = w["image"].pwrite

        def run() -> None:
            for off in next(rounds):
                tracked(data, off)

    elif variant == "cffi":  # what TrackedImage.pwrite is without blockmirror._fastwrite
        image = w["image"]
        fallback = _writer.cffi_pwrite_function(image.tracker._h, image._fd, image.path)

        def run() -> None:
            for off in next(rounds):
                fallback(data, off)

    else:  # "c": the C function called straight, no Python wrapper (a floor)
        bm_pwrite = lib.bm_pwrite
        handle, fd = w["image"].tracker._h, w["image"]._fd

        def run() -> None:
            for off in next(rounds):
                bm_pwrite(handle, fd, data, size, off)

    return run


@pytest.mark.parametrize("variant", ["os", "tracked", "cffi", "c"])
@pytest.mark.parametrize("size", [4096, MiB], ids=["4KiB", "1MiB"])
def test_pwrite(benchmark, report, writers, variant: str, size: int) -> None:
    label = SIZE_LABEL[size]
    benchmark.group = f"pwrite {label} into the page cache"
    benchmark(_pwrite_round(variant, size, writers))
    names = {
        "os": f"os.pwrite {label} (baseline)",
        "tracked": f"TrackedImage.pwrite {label}"
        + ("" if _writer._fastwrite else " [_fastwrite not built: cffi]"),
        "cffi": f"  TrackedImage.pwrite {label}, cffi fallback",
        "c": f"  lib.bm_pwrite {label}, no Python layer (floor)",
    }
    report(
        benchmark,
        f"pwrite-{size}-{variant}",
        names[variant],
        ops=WRITES_PER_ROUND[size],
        baseline=None if variant == "os" else f"pwrite-{size}-os",
        target_ratio=PWRITE_TARGET.get(size) if variant == "tracked" else None,
    )


# The same comparison, proofed against drift: on a shared 2-core machine the
# page cache's state (writeback, other jobs) changes over the seconds between
# two benchmarks. Here blocks of tracked and untracked writes alternate and
# every pair of blocks gives one ratio; the summary reports the median pair
# ratio. Both blocks of a pair write at the same positions within their
# page-cache folios (a 4 KiB write's kernel cost depends on it), in opposite
# halves of the region so neither finds pages the other just dirtied; order
# (ABBA) and halves alternate so neither side is favoured.
PAIRS = {4096: 1000, MiB: 400}
BLOCK = {4096: 64, MiB: 4}


@pytest.mark.parametrize("size", [4096, MiB], ids=["4KiB", "1MiB"])
def test_pwrite_interleaved(benchmark, report_paired, writers, size: int) -> None:
    clock = time.perf_counter_ns
    data = os.urandom(size)
    half = writers["region"] // 2
    offsets = itertools.cycle(range(0, half, size))
    tracked, pwrite, fd = writers["image"].pwrite, os.pwrite, writers["fd"]

    def timed_block(use_tracked: bool, offs: list[int]) -> int:
        start = clock()
        if use_tracked:
            for off in offs:
                tracked(data, off)
        else:
            for off in offs:
                pwrite(fd, data, off)
        return clock() - start

    ratios: list[float] = []

    def experiment() -> None:
        for i in range(PAIRS[size]):
            low = [next(offsets) for _ in range(BLOCK[size])]
            high = [off + half for off in low]
            mine, theirs = (low, high) if i // 2 % 2 else (high, low)
            if i % 2:
                untracked = timed_block(False, theirs)
                with_tracking = timed_block(True, mine)
            else:
                with_tracking = timed_block(True, mine)
                untracked = timed_block(False, theirs)
            ratios.append(with_tracking / untracked)

    benchmark.group = "pwrite A/B interleaved (the ratio is in the summary)"
    benchmark.pedantic(experiment, rounds=1, iterations=1, warmup_rounds=0)
    q1, median, q3 = statistics.quantiles(ratios, n=4)
    benchmark.extra_info.update(key=f"pwrite-{size}-paired", paired_ratio_median=median,
                                paired_ratio_q1=q1, paired_ratio_q3=q3, pairs=len(ratios))
    label = SIZE_LABEL[size]
    report_paired(
        f"pwrite-{size}-paired",
        f"TrackedImage.pwrite {label}, interleaved with os.pwrite",
        "os.pwrite",
        ratios,
        target_ratio=PWRITE_TARGET.get(size),
    )


# -- the 1 TiB bitmap ----------------------------------------------------------------

SCAN_GROUP = "1 TiB bitmap, 64 KiB granules, 0.1 % dirty"
SCAN_ROUNDS = 60
FETCH_TARGET_S = 5e-3


def _remark(sparse) -> Callable[[], None]:  # type: ignore[no-untyped-def]
    """The untimed setup of a round: dirty the chosen granules again."""
    mark, offsets = sparse.tracker.mark, sparse.offsets

    def setup() -> None:
        for off in offsets:
            mark(off, 1)

    return setup


def _dirty_only(sparse) -> None:  # type: ignore[no-untyped-def]
    """Leave exactly the chosen granules dirty."""
    sparse.tracker.fetch_and_clear_array()
    _remark(sparse)()


def _check_extents(extents: Any, sparse) -> None:  # type: ignore[no-untyped-def]
    # Neighbouring granules merge, so compare bytes, not extent counts.
    total = sum(int(length) for _, length in extents)
    assert total == len(sparse.offsets) * sparse.granularity


def test_scan_clean(benchmark, report, sparse_tib) -> None:
    sparse_tib.tracker.fetch_and_clear_array()
    benchmark.group = SCAN_GROUP
    result = benchmark(sparse_tib.tracker.fetch_and_clear)
    assert result == []
    report(benchmark, "scan-clean", "fetch_and_clear, 1 TiB, clean (baseline)")


@pytest.mark.parametrize("method", ["fetch_and_clear", "fetch_and_clear_array"])
def test_fetch_and_clear(benchmark, report, sparse_tib, method: str) -> None:
    sparse_tib.tracker.fetch_and_clear_array()
    benchmark.group = SCAN_GROUP
    result = benchmark.pedantic(
        getattr(sparse_tib.tracker, method),
        setup=_remark(sparse_tib),
        rounds=SCAN_ROUNDS,
        warmup_rounds=3,
    )
    _check_extents(result, sparse_tib)
    report(
        benchmark,
        f"scan-{method}",
        f"{method}, 1 TiB, 0.1 % dirty",
        baseline="scan-clean",
        target_s=FETCH_TARGET_S,
    )


def test_dirty_extents(benchmark, report, sparse_tib) -> None:
    _dirty_only(sparse_tib)
    benchmark.group = SCAN_GROUP
    result = benchmark(sparse_tib.tracker.dirty_extents)
    _check_extents(result, sparse_tib)
    report(
        benchmark,
        "scan-snapshot",
        "dirty_extents (snapshot), 1 TiB, 0.1 % dirty",
        baseline="scan-clean",
    )


def test_dirty_bytes(benchmark, report, sparse_tib) -> None:
    _dirty_only(sparse_tib)
    benchmark.group = SCAN_GROUP
    result = benchmark(sparse_tib.tracker.dirty_bytes)
    assert result == len(sparse_tib.offsets) * sparse_tib.granularity
    report(benchmark, "dirty-bytes", "dirty_bytes, 1 TiB, 0.1 % dirty", baseline="scan-clean")


# -- Tracker.mark ----------------------------------------------------------------------

MARKS_PER_ROUND = 1000
MARK_ROUNDS = 300
MARK_TARGET_S = 1e-6


class _Empty:
    def mark(self, offset: int, length: int) -> None:
        pass


@pytest.mark.parametrize("variant", ["empty-method", "c-noop", "c", "tracker"])
def test_mark(benchmark, report, sparse_tib, variant: str) -> None:
    """MARKS_PER_ROUND marks of 4 KiB at distinct granules, all clean when the
    round starts (the bitmap is cleared in the untimed setup), so every call
    really sets a bit."""
    tracker = sparse_tib.tracker
    offs = sparse_tib.offsets[:MARKS_PER_ROUND]
    handle, c_mark = tracker._h, lib.bm_mark
    if variant == "empty-method":
        mark = _Empty().mark

        def run() -> None:
            for off in offs:
                mark(off, 4096)

    elif variant == "c-noop":  # zero length: the C call returns at once

        def run() -> None:
            for off in offs:
                c_mark(handle, off, 0)

    elif variant == "c":

        def run() -> None:
            for off in offs:
                c_mark(handle, off, 4096)

    else:
        mark = tracker.mark

        def run() -> None:
            for off in offs:
                mark(off, 4096)

    def clear() -> None:  # untimed: every round starts on a clean bitmap
        tracker.fetch_and_clear_array()

    benchmark.group = "Tracker.mark, per call"
    benchmark.pedantic(run, setup=clear, rounds=MARK_ROUNDS, warmup_rounds=10)
    if variant in ("c", "tracker"):
        assert tracker.dirty_bytes() == len(offs) * sparse_tib.granularity
    names = {
        "empty-method": "empty Python method call (floor)",
        "c-noop": "  lib.bm_mark, zero length: bare cffi call (floor)",
        "c": "  lib.bm_mark, no Python layer",
        "tracker": "Tracker.mark",
    }
    report(
        benchmark,
        f"mark-{variant}",
        names[variant],
        ops=MARKS_PER_ROUND,
        baseline=None if variant == "empty-method" else "mark-empty-method",
        target_s=MARK_TARGET_S if variant == "tracker" else None,
    )
