"""The copy passes of one sync, each measured: bulk, incremental, dirty, final.

A :class:`PassRunner` copies and records; it knows nothing of freezes,
commits or convergence rules (the job and the policy decide those). Every
pass follows the clear-before-read rule (I2): dirty bits are taken before
their blocks are read, so a write landing meanwhile is marked again.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from blockmirror import _numpy
from blockmirror.copying.copier import Copier, CopyStats, DigestRequest
from blockmirror.extents import (
    Extent,
    intersect,
    pairs,
    subtract,
    total_bytes,
    union,
)
from blockmirror.migration.policy import PassRecord
from blockmirror.migration.result import ProgressCallback, SyncProgress, SyncResult

if TYPE_CHECKING:  # numpy-backed names: numpy loads while the bulk copy runs
    from blockmirror.extents import ExtentArray, Extents
    from blockmirror.migration.digests import DigestTable
    from blockmirror.migration.manifest import Manifest
    from blockmirror.migration.mirroring import MirrorSession
    from blockmirror.tracking.tracker import Tracker


def _up_to(extents: list[Extent], budget: int) -> list[Extent]:
    """The first BUDGET bytes of EXTENTS (in offset order, so the same hot
    blocks stay deferred pass after pass instead of churning)."""
    out: list[Extent] = []
    for offset, length in extents:
        if budget <= 0:
            break
        take = min(length, budget)
        out.append((offset, take))
        budget -= take
    return out


class ProgressReporter:
    """Sends SyncProgress to the caller's callback, if any."""

    def __init__(self, callback: ProgressCallback | None) -> None:
        self.callback = callback
        self.started = time.perf_counter()

    def __call__(self, phase: str, index: int, done: int = 0, total: int = 0,
                 rate: float = 0.0, dirty: int = 0) -> None:
        if self.callback is not None:
            self.callback(SyncProgress(phase, index, done, total, rate, dirty,
                                       time.perf_counter() - self.started))


@dataclass
class PassRunner:
    """Runs the passes of one sync from SRC_FD into DST_FD and records each
    in RESULT. MANIFEST, when updating an earlier copy in place, has the
    digests of every range forgotten before that range is rewritten.
    FRESH_DIGESTS, for a new copy that will get a manifest, starts as one
    hole. Either table then takes the digests each pass computed from its
    buffers (hash while copying, issue 11): the commit reads back only the
    granules no pass saw whole."""

    copier: Copier
    tracker: Tracker | None
    src_fd: int
    dst_fd: int
    result: SyncResult
    report: ProgressReporter
    manifest: Manifest | None = None
    fresh_digests: DigestTable | None = None
    # converge="mirror": the interlock each dirty pass's items hold (I7).
    mirror: MirrorSession | None = None
    # converge="mirror": dirty passes run paced (see ConvergencePolicy.mirror_copy_rate).
    paced: bool = False
    # Hot-block deferral: the bulk pass notes what writers dirtied in its first half.
    watch_hot: bool = False
    _last_taken: list[Extent] | None = None  # what the last dirty pass took (hot-block deferral)
    _touched: list[Extents] = field(default_factory=list)  # what this run wrote into the copy

    def touched(self) -> list[Extent]:
        """Every range written into the copy so far, merged."""
        return union(*(pairs(extents) for extents in self._touched))

    # -- the passes ---------------------------------------------------------

    def bulk(self) -> None:
        """Everything allocated in the source, into a fresh sparse copy. Each
        work item's dirty bits are cleared just before it is read, so a block
        written ahead of the pass is copied once, not again by a dirty pass
        (QEMU's mirror clears per chunk the same way). Its writeback starts as
        it goes: all of it is fsynced before the commit.

        The local copier takes the extents as pairs, so the copy starts
        without numpy, which the digests need only once it is done: numpy
        loads on another thread meanwhile (see blockmirror._numpy)."""
        extents: Extents
        table = self._table()
        started = None
        if self.copier.copies_pairs:
            extents = self.copier.allocated_extent_pairs()
            started = self.numpy_preload()
        else:
            extents = self.copier.allocated_extents()
        if table is not None:
            # Whole granules, so each is read (and hashed) whole; the holes
            # inside them are still skipped.
            # (Clipped to the source's size now: it may have grown since.)
            extents = _granule_aligned(extents, table.granularity,
                                       os.fstat(self.src_fd).st_size)
        stats = self._copy("bulk", extents, dst_fresh=True, start_writeback=True,
                           before_item=self._clear_before_read if self.tracker else None,
                           halfway=self._note_early_dirt if self.watch_hot else None,
                           started=started)
        self._record("bulk", stats)

    def numpy_preload(self) -> Callable[[], None] | None:
        """What starts loading numpy beside a bulk copy, if the sync needs
        numpy after it: for the digest table (the manifest) or the tracker's
        arrays. A sync that needs neither (untracked, no manifest: into an
        export, or --move) never loads it, and must not pay its import."""
        table = self._table()
        needed = self.tracker is not None or (table is not None and not table.pristine)
        return _numpy.preload if needed else None

    def incremental(self, extents: Extents) -> None:
        """The first pass onto an earlier copy: EXTENTS, copied in place."""
        stats = self._copy("incremental", extents, dst_fresh=False, start_writeback=True)
        self._record("incremental", stats)

    def dirty(self, defer_budget: int = 0) -> None:
        """Copy what writers dirtied since the last pass. Blocks dirty in this
        pass and the one before are hot: up to DEFER_BUDGET bytes of them are
        left dirty for the final pass instead of being copied every pass."""
        _, stats, deferred = self.take_dirty_and_copy("dirty", defer_budget)
        self._record("dirty", stats, deferred=deferred)

    def final(self) -> ExtentArray:
        """The last dirty blocks, with writers frozen; returns what it took,
        so a switchover that fails can put it back."""
        extents, stats, _ = self.take_dirty_and_copy("final")
        self._record("final", stats, dirty_left=0)
        return extents

    def take_dirty_and_copy(self, phase: str, defer_budget: int = 0
                            ) -> tuple[ExtentArray, CopyStats, int]:
        """Follow the source's size, take the dirty set (clear before read,
        I2), put hot blocks back (see ``dirty``) and copy the rest; returns
        the extents taken, what the copy did and the bytes deferred."""
        assert self.tracker is not None, "only a tracked source has dirty passes"
        self.follow_source_size()
        dirty = self.tracker.dirty_bytes()
        extents = self.tracker.fetch_and_clear_array()
        to_copy: Extents = extents
        deferred = 0
        if phase == "dirty":
            to_copy, deferred = self._defer_hot(extents, defer_budget)
        # With writers frozen (the final pass) no mirrored write can race.
        mirror = self.mirror if phase != "final" else None
        return extents, self._copy(phase, to_copy, dst_fresh=False, dirty=dirty,
                                   before_item=mirror.claim if mirror else None,
                                   after_item=mirror.release if mirror else None), deferred

    def _defer_hot(self, extents: ExtentArray, budget: int) -> tuple[Extents, int]:
        """Split EXTENTS (just taken) into what to copy now and hot blocks,
        taken by the last dirty pass too, marked dirty again for the final
        pass (re-marking only ever adds dirt, so nothing is lost)."""
        assert self.tracker is not None
        taken = pairs(extents)
        last, self._last_taken = self._last_taken, taken
        if budget <= 0 or last is None:
            return extents, 0
        hot = _up_to(intersect(taken, last), budget)
        hot_bytes = total_bytes(hot)
        if not hot:
            return extents, 0
        for offset, length in hot:
            self.tracker.mark(offset, length)
        return subtract(taken, hot), hot_bytes

    def _note_early_dirt(self) -> None:
        """Halfway through the bulk pass: blocks already dirty were written
        within half a pass of being copied. The first dirty pass counts them
        as seen dirty before, so hot blocks can wait from that pass on (the
        target usually fits after it, and then nothing is deferred)."""
        assert self.tracker is not None
        self._last_taken = self.tracker.dirty_extents()  # a look; the bits stay

    def follow_source_size(self) -> None:
        """Writers may grow or shrink the image; the copy follows its size."""
        size = os.fstat(self.src_fd).st_size
        if size != os.fstat(self.dst_fd).st_size:
            if self.manifest is not None:
                self.manifest.resize(size)
            if self.fresh_digests is not None:
                self.fresh_digests.resize(size)
            os.ftruncate(self.dst_fd, size)
        self.result.image_size = size

    # -- one pass -----------------------------------------------------------

    def _clear_before_read(self, item: ExtentArray) -> None:
        assert self.tracker is not None
        for offset, length in pairs(item):
            self.tracker.clear_range(offset, length)

    def _copy(self, phase: str, extents: Extents, *, dst_fresh: bool, dirty: int = 0,
              start_writeback: bool = False,
              before_item: Callable[[ExtentArray], None] | None = None,
              after_item: Callable[[ExtentArray], None] | None = None,
              halfway: Callable[[], None] | None = None,
              started: Callable[[], None] | None = None) -> CopyStats:
        if self.manifest is not None:
            # The copy is about to change under these digests: forget them
            # durably first, so a crash can never leave one that lies.
            self.manifest.forget(pairs(extents))
        table = self._table()
        request = DigestRequest(table.granularity) if table is not None else None
        self._touched.append(extents)
        index = len(self.result.passes)
        total = total_bytes(extents)
        start = time.perf_counter()
        done = 0

        def on_progress(nbytes: int) -> None:
            nonlocal done, halfway
            done += nbytes
            if halfway is not None and 2 * done >= total:
                halfway()
                halfway = None
            elapsed = time.perf_counter() - start
            self.report(phase, index, done, total, done / elapsed if elapsed > 0 else 0.0, dirty)

        stats = self.copier.copy_extents(
            extents, dst_fresh=dst_fresh,
            progress=on_progress if self.report.callback or halfway else None,
            start_writeback=start_writeback, before_item=before_item, after_item=after_item,
            digests=request, in_flight=started,
        )
        if table is not None and request is not None:
            # A new copy's table lives in memory only and nothing reads it
            # during the copy: what the copy touched becomes unknown now,
            # then gets the digests the copy took (a manifest's was forgotten
            # durably above).
            table.learn(request, pairs(extents) if self.manifest is None else None)
        return stats

    def _table(self) -> DigestTable | None:
        """The digests this run keeps up to date, if any."""
        return self.manifest.table if self.manifest is not None else self.fresh_digests

    def _record(self, kind: str, stats: CopyStats, dirty_left: int | None = None,
                deferred: int = 0) -> None:
        if dirty_left is None:
            dirty_left = self.tracker.dirty_bytes() if self.tracker is not None else 0
        self.result.passes.append(PassRecord(
            index=len(self.result.passes), kind=kind, bytes=stats.copied,
            seconds=stats.seconds, dirty_left=dirty_left, bytes_written=stats.bytes_written,
            deferred=deferred, paced=self.paced and kind == "dirty",
        ))
        self.result.bytes_copied += stats.copied
        self.result.bytes_written += stats.bytes_written


def _granule_aligned(extents: Extents, granularity: int, size: int) -> list[Extent]:
    """EXTENTS rounded out to whole granules (clipped to SIZE), sorted and
    merged (``dg.granule_runs`` then ``dg.byte_extents``, without numpy)."""
    g = granularity
    granules = -(-size // g)
    runs: list[list[int]] = []
    for offset, length in sorted(pairs(extents)):
        start, end = offset // g, min(granules, -(-(offset + length) // g))
        if length <= 0 or start >= end:
            continue
        if runs and start <= runs[-1][1]:
            runs[-1][1] = max(runs[-1][1], end)
        else:
            runs.append([start, end])
    return [(s * g, min(size, e * g) - s * g) for s, e in runs if min(size, e * g) > s * g]
