"""A dirty pass (blockmirror/migration/passes.py) clears each work item's
dirty bits just before reading it, puts hot blocks last while writers mirror
or hot blocks are deferred, and the first mirrored pass after unmirrored
ones takes the whole hot set back (issue 10: writers rewrite it on the
source alone until the copy reaches it). A fake copier stands in for the
copy, so each test says exactly when a "writer" writes."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from blockmirror import Tracker
from blockmirror.copying.copier import CopyStats
from blockmirror.extents import pairs
from blockmirror.migration.passes import PassRunner, ProgressReporter
from blockmirror.migration.result import SyncResult

KiB = 1024
G = 64 * KiB  # the tracked_image fixture's granularity
Hook = Callable[[Any], None]


class FakeCopier:
    """Copies nothing: hands each extent to the hooks as one item, in the
    order given, and calls DURING(index) inside item INDEX (a writer's
    write while the pass runs)."""

    def __init__(self, during: Callable[[int], None] | None = None) -> None:
        self.during = during
        self.items: list[tuple[int, int]] = []
        self.aligns: list[int] = []
        self.pace_rate = 0.0  # as Copier.pace sets it

    def copy_extents(self, extents: Any, *, before_item: Hook | None = None,
                     after_item: Hook | None = None, align: int = 1,
                     **_: Any) -> CopyStats:
        self.aligns.append(align)
        copied = 0
        for extent in pairs(extents):
            item = [extent]
            if before_item is not None:
                before_item(item)
            if self.during is not None:
                self.during(len(self.items))
            self.items.append(extent)
            copied += extent[1]
            if after_item is not None:
                after_item(item)
        return CopyStats(bytes_read=copied, bytes_written=copied)


class FakeMirror:
    """The interlock's calls, recorded (MirrorSession's claim/release)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def claim(self, item: Any) -> None:
        self.calls.append(f"claim {pairs(item)[0][0] // G}")

    def release(self, item: Any) -> None:
        self.calls.append(f"release {pairs(item)[0][0] // G}")


@pytest.fixture
def tracker(tracked_image: Path) -> Iterator[Tracker]:
    t = Tracker.open(tracked_image)
    try:
        yield t
    finally:
        t.close()


def runner(tracker: Tracker, copier: FakeCopier, tmp_path: Path) -> PassRunner:
    fd = os.open(tmp_path / "dst", os.O_RDWR | os.O_CREAT)  # the fake copier never reads it
    os.ftruncate(fd, tracker.image_size)
    result = SyncResult(status="running", source="src", destination="dst", mode="copy",
                        tracked=True, image_size=tracker.image_size,
                        allocated_bytes=tracker.image_size, target_downtime=0.5)
    return PassRunner(copier=copier, tracker=tracker, src_fd=fd, dst_fd=fd,  # type: ignore[arg-type]
                      result=result, report=ProgressReporter(None))


def granules(extents: list[tuple[int, int]]) -> list[int]:
    return [o // G + k for o, n in extents for k in range(n // G)]


def test_a_block_rewritten_before_the_pass_reaches_it_is_copied_once(
        tracker: Tracker, tmp_path: Path) -> None:
    """Granule 7 is rewritten while the pass copies granule 0. Its bits were
    still set (cleared only just before its item is read), so the pass
    takes the new data and nothing is left dirty; had the pass taken the
    whole set at its start, granule 7 would be dirty again and copied by
    the next pass too."""
    for g in (0, 3, 7):
        tracker.mark(g * G, G)
    copier = FakeCopier(during=lambda i: tracker.mark(7 * G, G) if i == 0 else None)
    run = runner(tracker, copier, tmp_path)
    run.dirty()
    assert granules(copier.items) == [0, 3, 7]
    assert tracker.dirty_bytes() == 0
    assert run.result.passes[-1].dirty_left == 0
    # A write after its item was read is still seen (I1/I2): marked again.
    copier.items.clear()
    copier.during = lambda i: tracker.mark(0, G) if i == 1 else None
    for g in (0, 3):
        tracker.mark(g * G, G)
    run.dirty()
    assert tracker.dirty_extents() == [(0, G)]


def test_items_are_cut_at_whole_granules(tracker: Tracker, tmp_path: Path) -> None:
    """Only granules an item covers whole are cleared, so the pass asks the
    copier to cut items at the granularity (else a granule split between
    two items would never be cleared, and never leave the dirty set)."""
    tracker.mark(0, 4 * G)
    copier = FakeCopier()
    runner(tracker, copier, tmp_path).dirty()
    assert copier.aligns == [tracker.granularity]


def test_while_mirroring_hot_blocks_go_last_each_claimed_before_cleared(
        tracker: Tracker, tmp_path: Path) -> None:
    """Granules 1-2 were taken by the last pass too (hot): copied after the
    cold ones, so until the copy reaches them writers rewrite them on the
    source alone. Each item is claimed (I7) before its bits are cleared and
    released after it is copied."""
    copier = FakeCopier()
    run = runner(tracker, copier, tmp_path)
    run._last_taken = [(1 * G, 2 * G)]
    mirror = FakeMirror()
    run.mirror = mirror  # type: ignore[assignment]
    seen_dirty: list[bool] = []
    copier.during = lambda i: seen_dirty.append(tracker.dirty_bytes() > 0)
    for g in (1, 2, 5, 9):
        tracker.mark(g * G, G)
    run.dirty()
    assert granules(copier.items) == [5, 9, 1, 2]
    assert mirror.calls[:2] == ["claim 5", "release 5"]
    assert seen_dirty == [True, True, False]  # the hot ones (one item) dirty until reached
    assert tracker.dirty_bytes() == 0


def test_without_mirror_or_deferral_the_pass_keeps_offset_order(
        tracker: Tracker, tmp_path: Path) -> None:
    copier = FakeCopier()
    run = runner(tracker, copier, tmp_path)
    run._last_taken = [(1 * G, 2 * G)]
    for g in (1, 2, 5):
        tracker.mark(g * G, G)
    run.dirty()
    assert granules(copier.items) == [1, 2, 5]


def test_deferral_holds_hot_blocks_dirty_and_puts_the_rest_last(
        tracker: Tracker, tmp_path: Path) -> None:
    """With a budget of one granule the first hot granule waits (its bit
    stays set, for the final pass); the other hot ones go after the cold."""
    copier = FakeCopier()
    run = runner(tracker, copier, tmp_path)
    run.watch_hot = True
    run._last_taken = [(1 * G, 3 * G)]
    for g in (1, 2, 3, 8):
        tracker.mark(g * G, G)
    run.dirty(defer_budget=G + G // 2)  # rounded down to whole granules
    assert granules(copier.items) == [8, 2, 3]
    assert tracker.dirty_extents() == [(1 * G, G)]
    assert run.result.passes[-1].deferred == G


def first_mirrored_pass(tracker: Tracker, tmp_path: Path, pace: float,
                        elsewhere: tuple[int, ...] = (10,),
                        ) -> tuple[FakeCopier, list[list[tuple[int, int]]], PassRunner]:
    """An unmirrored pass takes granules 0-3 (the hot spot) and writers
    dirty 2 granules in its 0.1 s (~1.3 MB/s); they then rewrite 0 and 1
    and write granules ELSEWHERE before the mirror starts. The first mirrored pass runs at
    PACE; returns the copier, the dirty set seen inside its first item, and
    the runner."""
    copier = FakeCopier()
    run = runner(tracker, copier, tmp_path)
    tracker.mark(0, 4 * G)
    run.dirty()  # unmirrored
    assert granules(copier.items) == [0, 1, 2, 3]
    run.result.passes[-1] = replace(run.result.passes[-1], seconds=0.1, dirty_left=2 * G)
    tracker.mark(0, 2 * G)
    for g in elsewhere:
        tracker.mark(g * G, G)
    run.mirror = FakeMirror()  # type: ignore[assignment]
    copier.items.clear()
    copier.pace_rate = pace
    seen: list[list[tuple[int, int]]] = []
    copier.during = lambda i: seen.append(tracker.dirty_extents()) if i == 0 else None
    run.dirty()
    return copier, seen, run


def test_the_first_mirrored_pass_takes_back_the_whole_hot_set(
        tracker: Tracker, tmp_path: Path) -> None:
    """Writers outpace the copy's pace (1.3 MB/s dirtied, 1 MB/s paced): the
    first mirrored pass marks 2 and 3 dirty again and copies all four last,
    so writers rewrite them without mirroring until then; the next mirrored
    pass does not (else it would never get to zero)."""
    copier, seen, run = first_mirrored_pass(tracker, tmp_path, pace=1e6)
    assert granules(copier.items) == [10, 0, 1, 2, 3]
    assert seen == [[(0, 4 * G)]]  # granules 2-3 dirty again while the pass ran
    assert tracker.dirty_bytes() == 0
    copier.items.clear()
    copier.during = None
    tracker.mark(5 * G, G)
    run.dirty()
    assert granules(copier.items) == [5]


def test_slower_writers_leave_the_clean_hot_blocks_alone(
        tracker: Tracker, tmp_path: Path) -> None:
    """Paced at 10 MB/s, above the writers' 1.3: they would rewrite little
    of the hot set before the copy reaches it, so only what is dirty is
    copied (hot last), and the switch is not delayed."""
    copier, seen, _ = first_mirrored_pass(tracker, tmp_path, pace=1e7)
    assert granules(copier.items) == [10, 0, 1]
    assert seen == [[(0, 2 * G)]]


def test_spread_writes_leave_the_clean_hot_blocks_alone(
        tracker: Tracker, tmp_path: Path) -> None:
    """Writers outpace the copy but rewrote granules 0-3 no more densely
    than the rest of the image (half of them, and half of granules 10-49):
    no hot spot, so nothing is taken back (copying it again would only
    delay the switch)."""
    copier, seen, _ = first_mirrored_pass(tracker, tmp_path, pace=1e6,
                                          elsewhere=tuple(range(10, 50, 2)))
    assert granules(copier.items) == [*range(10, 50, 2), 0, 1]
    assert seen == [[(0, 2 * G), *((g * G, G) for g in range(12, 50, 2))]]

