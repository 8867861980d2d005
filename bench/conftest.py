"""Fixtures and the ratio report for the tracker micro-benchmarks.

pytest-benchmark times whole rounds; a round here is usually a batch of
operations (512 writes, 1000 marks), because one 4 KiB write is too short to
time alone. Each benchmark therefore registers itself with :func:`report`,
saying how many operations a round holds and which benchmark of the same run
is its baseline. At the end, :func:`pytest_terminal_summary` prints one line
per benchmark: median per operation, the ratio to its baseline's median and,
where the issue sets one, whether the target is met.

Medians, not means: the machine is shared and noisy, and a median over
hundreds of rounds shrugs off the odd scheduling hiccup.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

MiB = 1 << 20
TiB = 1 << 40

# The page-cache write benchmarks cycle over this region of one pre-written file.
WRITE_REGION = 64 * MiB

# The 1 TiB bitmap benchmarks: granularity and fraction of granules dirty.
SPARSE_SIZE = 1 * TiB
SPARSE_GRANULARITY = 64 * 1024
DIRTY_FRACTION = 0.001
SEED = 20261127


# -- the report ------------------------------------------------------------------


@dataclass
class Result:
    key: str
    label: str
    ops: int
    median_s: float  # per round
    q1_s: float
    q3_s: float
    rounds: int
    baseline: str | None
    target_ratio: float | None
    target_s: float | None  # per operation

    @property
    def per_op(self) -> float:
        return self.median_s / self.ops

    @property
    def per_op_q1(self) -> float:
        return self.q1_s / self.ops

    @property
    def per_op_q3(self) -> float:
        return self.q3_s / self.ops


@dataclass
class PairedResult:
    """A ratio from interleaved A/B blocks: one ratio per pair of blocks."""

    key: str
    label: str
    baseline_label: str
    ratios: list[float]
    target_ratio: float | None


_results_key = pytest.StashKey[dict[str, Result | PairedResult]]()


def _results(config: pytest.Config) -> dict[str, Result | PairedResult]:
    return config.stash.setdefault(_results_key, {})


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Callable[..., None]:
    """``report(benchmark, key, label, ops=1, baseline=None, target_ratio=None,
    target_s=None)``: register a finished benchmark for the summary.

    KEY names it (``baseline`` refers to another benchmark's key), OPS is the
    number of operations one round performs, TARGET_RATIO bounds the ratio to
    the baseline, TARGET_S bounds the median time per operation.
    """

    def _report(
        benchmark: object,
        key: str,
        label: str,
        *,
        ops: int = 1,
        baseline: str | None = None,
        target_ratio: float | None = None,
        target_s: float | None = None,
    ) -> None:
        meta = getattr(benchmark, "stats", None)
        if meta is None:  # --benchmark-disable: ran once, nothing timed
            return
        stats = meta.stats
        benchmark.extra_info.update(ops_per_round=ops, key=key)  # type: ignore[attr-defined]
        _results(request.config)[key] = Result(
            key, label, ops, stats.median, stats.q1, stats.q3, stats.rounds,
            baseline, target_ratio, target_s,
        )

    return _report


@pytest.fixture
def report_paired(request: pytest.FixtureRequest) -> Callable[..., None]:
    """``report_paired(key, label, baseline_label, ratios, target_ratio=None)``:
    register per-pair ratios of an interleaved A/B run for the summary."""

    def _report(
        key: str,
        label: str,
        baseline_label: str,
        ratios: list[float],
        target_ratio: float | None = None,
    ) -> None:
        _results(request.config)[key] = PairedResult(
            key, label, baseline_label, ratios, target_ratio
        )

    return _report


def _verdict(value: float, limit: float, text: str) -> str:
    return f"{'':>60}-> target <= {text}: {'MET' if value <= limit else 'MISSED'}"


def _fmt_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    results = _results(terminalreporter.config)
    if not results:
        return
    write = terminalreporter.write_line
    terminalreporter.section("blockmirror bench: median per operation, ratios within this run")
    write(
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}  {platform.node()}  Linux {platform.release()}"
        f"  Python {platform.python_version()}  {os.cpu_count()} CPUs"
    )
    write("median per op [IQR]; ratio = median / baseline median; target verdicts on medians")
    for r in results.values():
        if isinstance(r, PairedResult):
            q = np.percentile(r.ratios, [25, 50, 75])
            write(
                f"{r.label:<58} {q[1]:5.2f}x {r.baseline_label}, median of {len(r.ratios)}"
                f" interleaved pairs [IQR {q[0]:.2f} - {q[2]:.2f}]"
            )
            if r.target_ratio is not None:
                write(_verdict(q[1], r.target_ratio, f"{r.target_ratio:.2f}x"))
            continue
        line = (
            f"{r.label:<58} {_fmt_time(r.per_op):>9}"
            f" [{_fmt_time(r.per_op_q1)} - {_fmt_time(r.per_op_q3)}]"
        )
        base = results.get(r.baseline) if r.baseline else None
        if isinstance(base, Result):
            ratio = r.per_op / base.per_op
            line += f"  {ratio:5.2f}x {base.label}"
        write(line)
        if isinstance(base, Result) and r.target_ratio is not None:
            write(_verdict(r.per_op / base.per_op, r.target_ratio, f"{r.target_ratio:.2f}x"))
        if r.target_s is not None:
            write(_verdict(r.per_op, r.target_s, _fmt_time(r.target_s)))


# -- fixtures --------------------------------------------------------------------


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench")


@dataclass
class CachedImage:
    path: Path
    size: int


@dataclass
class SparseBitmap:
    tracker: Any  # blockmirror.Tracker
    offsets: list[int]  # byte offsets of the granules to dirty
    granularity: int


@pytest.fixture(scope="module")
def page_cache_image(bench_dir: Path) -> CachedImage:
    """A fully written 64 MiB image (no holes, blocks allocated, in the page
    cache), so every benchmarked write overwrites cached data: steady state
    for both the tracked path and the os.pwrite baseline, which write the very
    same file."""
    path = bench_dir / "cached.img"
    chunk = os.urandom(MiB)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for off in range(0, WRITE_REGION, MiB):
            os.pwrite(fd, chunk, off)
        os.fsync(fd)
    finally:
        os.close(fd)
    return CachedImage(path, WRITE_REGION)


@pytest.fixture(scope="module")
def sparse_tib(bench_dir: Path) -> Iterator[SparseBitmap]:
    """A tracker on a 1 TiB sparse image (apparent size, nothing written) at
    64 KiB granularity, and the byte offsets of 0.1 % of its granules, chosen
    at random once (fixed seed) so every round dirties the same set."""
    from blockmirror import Tracker

    path = bench_dir / "sparse-1tib.img"
    with open(path, "wb") as f:
        f.truncate(SPARSE_SIZE)
    tracker = Tracker.create(path, granularity=SPARSE_GRANULARITY)
    granules = SPARSE_SIZE // SPARSE_GRANULARITY
    rng = np.random.default_rng(SEED)
    chosen = np.sort(rng.choice(granules, int(granules * DIRTY_FRACTION), replace=False))
    offsets = (chosen.astype(np.uint64) * np.uint64(SPARSE_GRANULARITY)).tolist()
    yield SparseBitmap(tracker, offsets, SPARSE_GRANULARITY)
    tracker.close()
