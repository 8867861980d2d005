"""Copying extents from a source file to the same offsets of a destination.

A :class:`Copier` is the engine under every pass of a sync. It cuts the
extents it is given into work items of at most ``batch_bytes`` and hands each
item to one C call (``bm_copy_extents``) on a pool of threads. cffi releases
the GIL for the call, so ``workers`` requests are truly in flight at once,
which is what decides throughput where each request pays a round trip (NFS).

Inside a call the copy stays sparse: source holes are found with
SEEK_DATA/SEEK_HOLE and not read; data is read a buffer at a time and its
all-zero blocks are not written. Over a fresh destination region (the bulk
pass into a new sparse file) zeros and holes are simply skipped; otherwise
(dirty passes) they are punched out of the destination, or overwritten with
zeros where the filesystem cannot punch.

``copy_file_range`` moves data inside the kernel but skips zero detection,
so by default it is used only when the source's filesystem reports holes:
there the holes already keep the copy sparse. Where it reports the whole
file as data (FUSE, NFS before 4.2), reading and checking for zeros is the
only way to keep the copy sparse. Nor is it used by default onto ext2/3/4,
which has no copy of its own: the kernel then splices the pages through a
64 KiB pipe on one thread at a time (the file's lock), and read/write on a
few threads, one reading while another writes, was faster (1 GiB cached:
0.24 s against 0.31 s; bench/README.md, "Cached bulk copy").
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, TypeVar

from blockmirror._bindings import copy as _c
from blockmirror.closeable import Closeable
from blockmirror.extents import (
    Extent,
    as_extent_array,
    is_extent_array,
    merge_touching,
    pairs,
    split_extents,
    total_bytes,
)

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from blockmirror.extents import ExtentArray, Extents
else:
    # numpy loads on first use: a bulk copy handed pairs starts without it
    # (see blockmirror._numpy).
    from blockmirror._numpy import np

# A work item: an extent array, or (handed pairs, on the local copier) a
# list of pairs, which needs no numpy.
WorkItem = Any

MiB = 1 << 20
DEFAULT_BATCH_BYTES = 32 * MiB
DEFAULT_BLOCK_SIZE = 65536
# 256 KiB, not the C default (1 MiB): four buffers then stay in the two
# cores' caches while they are written out (1 GiB cached: 0.24 s, 1 MiB 0.28 s).
DEFAULT_BUFFER_BYTES = 256 * 1024
# A hashing copy takes a larger buffer where a granule needs one, up to this
# (what digests were served from C with before the buffer shrank).
MAX_HASH_BUFFER_BYTES = _c.DEFAULT_BUFFER
# ext2/3/4's statfs f_type: copy_file_range there is a plain splice.
_EXT4_MAGIC = 0xEF53
MIN_BLOCK_SIZE = _c.MIN_BLOCK
MAX_BLOCK_SIZE = _c.MAX_BLOCK
# Small copies are cut finer than batch_bytes so every worker gets work,
# but never below this.
MIN_ITEM_BYTES = 1 * MiB
# Seconds of pace a paced copy may make up after items slower than their time.
PACE_CATCH_UP = 0.5


@dataclass
class CopyStats:
    """What a copy did. Summable: ``a + b`` adds every field.

    For any copy, ``bytes_read + bytes_hole == copied`` (the source bytes
    processed) and ``bytes_written + bytes_zero == bytes_read``.
    """

    bytes_read: int = 0
    """Data bytes taken from the source (read, or moved by copy_file_range)."""
    bytes_written: int = 0
    """Data bytes put into the destination."""
    bytes_zero: int = 0
    """Bytes read, found all-zero and not written."""
    bytes_hole: int = 0
    """Source holes (and bytes past the source's end) skipped without reading."""
    bytes_punched: int = 0
    """Destination bytes made zero by punching a hole (or writing zeros where
    punching is unsupported); only outside fresh regions."""
    seconds: float = 0.0
    """Wall time of the copy."""

    @property
    def copied(self) -> int:
        """Bytes of the source range processed."""
        return self.bytes_read + self.bytes_hole

    @property
    def throughput(self) -> float:
        """Source bytes processed per second (0 when nothing was timed)."""
        return self.copied / self.seconds if self.seconds > 0 else 0.0

    def __add__(self, other: CopyStats) -> CopyStats:
        if not isinstance(other, CopyStats):
            return NotImplemented
        return CopyStats(
            **{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)}
        )


@dataclass
class DigestRequest:
    """Asks :meth:`Copier.copy_extents` for the xxh3-64 digest of every
    GRANULARITY granule it copies whole, taken from the buffer the data was
    read into (the data is read once; see bm_copy_extents_hashed). Granules
    it could not see whole (cut by an extent's edge or the source's end) get
    none: the caller digests those itself. Collects from every worker."""

    granularity: int
    # (granules, digests) arrays; or, from an item of pairs, (the item, its
    # slots' digests in a cffi uint64_t[], 0 where none), turned into arrays
    # by take() (after the copy: numpy may still be loading while it runs).
    found: list[tuple[Any, Any]] = field(default_factory=list)

    def take(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint64]]:
        """The granules digested so far (sorted) and their digests; forgets them."""
        found, self.found = self.found, []
        if not found:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.uint64)
        parts = [self._as_arrays(k, v) for k, v in found]
        keys = np.concatenate([k for k, _ in parts])
        values = np.concatenate([v for _, v in parts])
        order = np.argsort(keys, kind="stable")
        return keys[order], values[order]

    def _as_arrays(self, keys: Any, values: Any
                   ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint64]]:
        if not isinstance(keys, list):
            return keys, values
        slots = _c.digest_slots(as_extent_array(keys), self.granularity)
        out = np.frombuffer(_c.slot_values(values, len(slots)), dtype=np.uint64)
        whole = np.flatnonzero(out)
        return slots[whole], out[whole]


def digest_granules(fd: int, offset: int, length: int, granularity: int
                    ) -> npt.NDArray[np.uint64] | None:
    """The xxh3-64 digest of each GRANULARITY granule of FD's [OFFSET,
    OFFSET+LENGTH) (OFFSET on a granule boundary; the last granule may be
    short; bytes past the end read as zeros), read and hashed in C with the
    GIL released; None where C cannot call the digest (hash in Python then)."""
    return _c.digest_extents(fd, as_extent_array([(offset, length)]), granularity)


_F = TypeVar("_F", bound=Callable[..., Any])


def takes_pair_items(method: _F) -> _F:
    """Marks a copier's ``_copy_item_now`` as taking work items that are
    lists of pairs as well as extent arrays (see Copier.copies_pairs)."""
    setattr(method, "takes_pair_items", True)  # noqa: B010 - a mark on a function
    return method


def data_extents(fd: int, end: int) -> ExtentArray:
    """The data extents of FD over [0, END) (SEEK_DATA/SEEK_HOLE, in C); the
    whole range is one extent where the filesystem reports no holes."""
    return _c.data_extents(fd, end)


def _drain(futures: set[cf.Future[Any]]) -> None:
    """Wait until every future is done, whatever interrupts the wait: no
    worker may touch the fds once the copy call has returned."""
    while futures:
        try:
            _, futures = cf.wait(futures)
        except BaseException:  # a second Ctrl-C must not leave workers writing
            continue


class Copier(Closeable):
    """Copies extents of ``src_fd`` to the same offsets of ``dst_fd``.

    The copier does not own the file descriptors (it never closes them) and
    does not size the destination: copying past its end extends it where
    data is written, but a trailing zero run is not written, so the caller
    ftruncates the destination to the source's size. All I/O uses explicit
    offsets; only the source's file offset moves (SEEK_DATA/SEEK_HOLE). Use as a context
    manager, or call :meth:`close`, to stop the worker threads.

    Parameters:
        workers: threads, each with one C call (one request) in flight.
        batch_bytes: most source bytes per work item (one C call).
        block_size: zero-detection block, a power of two in
            [MIN_BLOCK_SIZE, MAX_BLOCK_SIZE]; all-zero blocks are not written.
        use_copy_file_range: True/False to force; None (auto) uses it when
            :meth:`source_reports_holes`. It is dropped for good at the first
            refusal (EXDEV, EOPNOTSUPP, ...), falling back to read/write.
        rate_limit: cap on the data moved, bytes/s over all workers (holes
            are free; None or 0: no cap); for benchmarks that emulate slower
            storage.
        buffer_bytes: each worker's read buffer (one read or write request
            is at most this big).
        src_path, dst_path: names put into raised OSErrors.
    """

    def __init__(
        self,
        src_fd: int,
        dst_fd: int,
        *,
        workers: int = 4,
        batch_bytes: int = DEFAULT_BATCH_BYTES,
        block_size: int = DEFAULT_BLOCK_SIZE,
        use_copy_file_range: bool | None = None,
        rate_limit: float | None = None,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        src_path: str | None = None,
        dst_path: str | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if batch_bytes < 1:
            raise ValueError(f"batch_bytes must be >= 1, got {batch_bytes}")
        if (
            block_size < MIN_BLOCK_SIZE
            or block_size > MAX_BLOCK_SIZE
            or block_size & (block_size - 1)
        ):
            raise ValueError(
                f"block_size {block_size} is not a power of two between "
                f"{MIN_BLOCK_SIZE} and {MAX_BLOCK_SIZE}"
            )
        if buffer_bytes < block_size:
            raise ValueError(f"buffer_bytes {buffer_bytes} is smaller than block_size")
        if rate_limit is not None and rate_limit < 0:
            raise ValueError(f"rate_limit must be >= 0, got {rate_limit}")
        self.src_fd = src_fd
        self.dst_fd = dst_fd
        self.workers = workers
        self.batch_bytes = batch_bytes
        self.block_size = block_size
        self.buffer_bytes = buffer_bytes
        self.src_path = src_path
        self.dst_path = dst_path
        self.rate_limit = rate_limit
        use_cfr = (
            self.prefers_copy_file_range() if use_copy_file_range is None
            else use_copy_file_range
        )
        # The C handle remembers what the filesystems refused (punching,
        # SEEK_DATA, copy_file_range) and stops asking, for every worker.
        self._copier = self._new_handle(use_cfr)
        self._rate_cap = (
            _c.new_rate_cap(max(1, round(rate_limit))) if rate_limit else None
        )
        self._local = threading.local()
        self._pace_lock = threading.Lock()
        self.pace_rate = 0.0  # bytes/s work items are spaced to (see pace); 0: none
        self._pace_next = 0.0
        # Work items are cut at multiples of this, so punches cover whole
        # blocks of the destination's filesystem as well as zero blocks.
        self._align = max(block_size, 4096)
        self._executor: cf.ThreadPoolExecutor | None = cf.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="blockmirror-copy"
        )

    def _new_handle(self, use_copy_file_range: bool) -> Any:
        """The C copier every work item uses (a subclass writing elsewhere
        than a local fd, copying.remote, makes its own)."""
        return _c.new_copier(self.src_fd, self.dst_fd, self.block_size,
                             copy_file_range=use_copy_file_range)

    # -- what the source looks like -----------------------------------------

    def source_reports_holes(self) -> bool:
        """Whether SEEK_HOLE on the source shows a real hole.

        False where the filesystem reports the whole file as data (FUSE, NFS
        before 4.2) and also for a source without holes: with nothing to tell
        them apart, only reading finds its zeros.
        """
        size = os.fstat(self.src_fd).st_size
        if size == 0:
            return False
        try:
            first_hole = os.lseek(self.src_fd, 0, os.SEEK_HOLE)
        except OSError:
            return False
        return first_hole < size

    def prefers_copy_file_range(self) -> bool:
        """What ``use_copy_file_range=None`` picks: the source reports holes
        and the destination is not on ext2/3/4 (see the module's doc)."""
        return self.source_reports_holes() and not _splices_only(self.dst_fd)

    def allocated_extents(self) -> ExtentArray:
        """The source's data extents over its current size (SEEK_DATA/SEEK_HOLE).

        The whole file is one extent where the filesystem reports no holes.
        """
        size = os.fstat(self.src_fd).st_size
        return data_extents(self.src_fd, size)

    @property
    def copies_pairs(self) -> bool:
        """Whether this copier copies extents handed as pairs without numpy
        (work items that are lists of pairs): where its ``_copy_item_now``
        says so (:func:`takes_pair_items`); copiers that override it
        without saying so are handed arrays."""
        return bool(getattr(type(self)._copy_item_now, "takes_pair_items", False))

    def allocated_extent_pairs(self) -> list[Extent]:
        """:meth:`allocated_extents` as pairs, found without numpy (where a
        subclass finds them its own way, its answer as pairs)."""
        if type(self).allocated_extents is not Copier.allocated_extents:
            return pairs(self.allocated_extents())
        size = os.fstat(self.src_fd).st_size
        return _c.data_extent_pairs(self.src_fd, size)

    @property
    def uses_copy_file_range(self) -> bool:
        """Whether data segments currently go through copy_file_range."""
        return bool(_c.capabilities(self._copier) & _c.CAN_FILE_RANGE)

    # -- copying --------------------------------------------------------------

    def copy_extents(
        self,
        extents: Extents,
        *,
        dst_fresh: bool = False,
        progress: Callable[[int], None] | None = None,
        start_writeback: bool = False,
        before_item: Callable[[WorkItem], None] | None = None,
        after_item: Callable[[WorkItem], None] | None = None,
        digests: DigestRequest | None = None,
        in_flight: Callable[[], None] | None = None,
    ) -> CopyStats:
        """Copy EXTENTS of the source to the same offsets of the destination.

        With DST_FRESH the caller promises the destination reads as zeros over
        the extents (a new sparse file): zeros and holes are skipped. Without
        it they are punched out of the destination, so old data there goes.

        PROGRESS, if given, is called in this thread as work items finish,
        with the number of source bytes that item processed (an increment).

        START_WRITEBACK queues each data write for writeback at once (no
        wait), so the disk works while the copy goes on and a caller that
        fsyncs at the end waits only for the tail (a durable 1 GiB bulk copy
        went from 0.76 s to 0.46 s here, see bench/README.md). It is no use,
        and may write blocks twice, when the same range is rewritten soon.

        BEFORE_ITEM, if given, is called on the worker thread with each work
        item's extents (an extent array, or a list of pairs where EXTENTS came
        as pairs: read it with ``pairs()``) just before they are read: a tracked copy clears their
        dirty bits there (clear before read, I2), so a block written ahead of
        the copy is read once, with its new data, instead of twice.
        AFTER_ITEM, if given, is called there once the item's bytes are on the
        destination (or its copy failed), if BEFORE_ITEM returned: a mirrored
        sync releases the interlock it took in BEFORE_ITEM.

        DIGESTS, if given and the digest can be called from C (and its
        granule fits the buffer), collects the digest of each granule
        copied whole; copy_file_range is not used then (the bytes must pass
        through the buffer).

        IN_FLIGHT, if given, is called in this thread once the first work
        items are in flight: a sync loads numpy there, beside the copy.

        Raises the first OSError of any work item (ENOSPC, EIO, ...) after
        stopping the others; the destination is then partly copied. Nothing
        touches the files once this returns or raises.
        """
        if self._executor is None:
            raise ValueError("copier is closed")
        executor = self._executor
        started = time.perf_counter()
        hashing = self._digest_spec(digests)
        align = max(self._align, digests.granularity) if digests and hashing else self._align
        items = self._work_items(extents, align)
        cancel = _c.new_cancel_flag()
        window = 2 * self.workers
        result = CopyStats()
        pending: set[cf.Future[CopyStats]] = set()

        def collect(done: Iterable[cf.Future[CopyStats]]) -> None:
            nonlocal result
            for future in done:
                stats = future.result()  # raises the item's OSError
                result = result + stats
                if progress is not None:
                    progress(stats.copied)

        try:
            queue: Iterator[WorkItem] = iter(items)
            for item in queue:
                if len(pending) == window and in_flight is not None:
                    in_flight()
                    in_flight = None
                while len(pending) >= window:
                    done, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                    collect(done)
                pending.add(
                    executor.submit(self._copy_item, item, dst_fresh, cancel, start_writeback,
                                    before_item, after_item, digests if hashing else None)
                )
            if in_flight is not None:  # fewer items than the window
                in_flight()
            while pending:
                done, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                collect(done)
        except BaseException:
            cancel[0] = 1  # running C calls stop within one buffer
            for future in pending:
                future.cancel()
            _drain(pending)
            raise
        result.seconds = time.perf_counter() - started
        return result

    def _work_items(self, extents: Extents, align: int) -> list[WorkItem]:
        """EXTENTS, touching ones merged, cut into work items (see
        _item_bytes): lists of pairs where this copier takes pairs and was
        handed pairs (no numpy), else extent arrays."""
        if self.copies_pairs and not is_extent_array(extents):
            merged = merge_touching_pairs(pairs(extents))
            return split_pairs(merged, self._item_bytes(total_bytes(merged)), align)
        arr = merge_touching(as_extent_array(extents))
        return list(split_extents(arr, self._item_bytes(total_bytes(arr)), align))

    def _digest_spec(self, digests: DigestRequest | None) -> bool:
        """Whether DIGESTS can be served from C on this copier."""
        if digests is None:
            return False
        g = digests.granularity
        return (_c.digest_function() is not None
                and MIN_BLOCK_SIZE <= g <= self._largest_hashed_granule()
                and not g & (g - 1))

    def _largest_hashed_granule(self) -> int:
        """The coarsest granule the C copy hashes from its own buffers."""
        return max(self.buffer_bytes, MAX_HASH_BUFFER_BYTES)

    def _buffer_len(self, digests: DigestRequest | None) -> int:
        """A worker's buffer: buffer_bytes, rounded up to whole granules
        when hashing (C ends full buffers on granule boundaries)."""
        if digests is None:
            return self.buffer_bytes
        g = digests.granularity
        return -(-self.buffer_bytes // g) * g

    def _item_bytes(self, total_bytes: int) -> int:
        """Work item size: batch_bytes, cut finer for small copies so each
        worker gets a few items."""
        share = -(-total_bytes // (self.workers * 4))
        return max(1, min(self.batch_bytes, max(MIN_ITEM_BYTES, share)))

    def _copy_item(
        self, item: WorkItem, dst_fresh: bool, cancel: Any, start_writeback: bool = False,
        before_item: Callable[[WorkItem], None] | None = None,
        after_item: Callable[[WorkItem], None] | None = None,
        digests: DigestRequest | None = None,
    ) -> CopyStats:
        """One C call, on a worker thread."""
        self._wait_for_pace(item)
        if before_item is not None:
            before_item(item)
        try:
            return self._copy_item_now(item, dst_fresh, cancel, start_writeback, digests)
        finally:
            if after_item is not None:
                after_item(item)

    @takes_pair_items
    def _copy_item_now(self, item: WorkItem, dst_fresh: bool, cancel: Any,
                       start_writeback: bool, digests: DigestRequest | None) -> CopyStats:
        size = self._buffer_len(digests)
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) != size:
            buf = self._local.buf = _c.new_buffer(size)
        flags = (_c.DST_FRESH if dst_fresh else 0) | (_c.START_WRITEBACK if start_writeback else 0)
        as_pairs = isinstance(item, list)  # see _work_items
        c_item = _c.pairs_array(item) if as_pairs else item
        spec = None
        if digests is not None:
            fn = _c.digest_function()
            assert fn is not None
            g = digests.granularity
            if as_pairs:
                out: Any = _c.new_digest_slots(_c.slot_count(item, g))
            else:
                slots = _c.digest_slots(item, g)
                out = np.zeros(len(slots), dtype=np.uint64)
            spec = (fn, g, _zero_digest(g), out)
        counts = _c.copy_extents(self._copier, c_item, buf, flags, self._rate_cap, cancel,
                                 self.src_path, self.dst_path, spec)
        if digests is not None and spec is not None:
            if as_pairs:
                digests.found.append((item, out))  # list.append: atomic
            else:
                whole = np.flatnonzero(out)
                digests.found.append((slots[whole], out[whole]))
        return CopyStats(counts.bytes_read, counts.bytes_written, counts.bytes_zero,
                         counts.bytes_hole, counts.bytes_punched)

    # -- lifetime -------------------------------------------------------------

    def pace(self, bytes_per_s: float | None) -> None:
        """Space the work items that follow so the copy moves at most
        BYTES_PER_S (None or 0: no pace), on top of any rate_limit.
        converge="mirror" paces its dirty passes this way, to what mirrored
        writes leave of the destination. Unlike rate_limit, which sleeps
        inside the C call, the wait comes before an item's BEFORE_ITEM: a
        paced copy never sleeps holding the mirror's interlock, where every
        write it blocked would have to be copied again."""
        with self._pace_lock:
            self.pace_rate = max(0.0, float(bytes_per_s or 0.0))
            self._pace_next = time.perf_counter()  # no credit from before

    def _wait_for_pace(self, item: WorkItem) -> None:
        """GCRA over whole items: each starts once those before it have had
        their time at pace_rate. An item that took longer than its time (a
        write the kernel held in its dirty throttle) leaves credit, up to
        PACE_CATCH_UP seconds of it, that the next items take back: without
        it a paced copy reached only 7-11 MiB/s of a 14 MiB/s pace
        (bench/README.md, issue 10)."""
        with self._pace_lock:
            if self.pace_rate <= 0:
                return
            now = time.perf_counter()
            due = max(self._pace_next, now - PACE_CATCH_UP)
            self._pace_next = due + total_bytes(item) / self.pace_rate
        if due > now:
            time.sleep(due - now)

    def close(self) -> None:
        """Stop the worker threads (after any running copy). Idempotent."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None


def _splices_only(fd: int) -> bool:
    """Whether FD's filesystem is ext2/3/4, where copy_file_range has no
    copy of its own (no reflink, no server-side copy) and falls back to
    splicing pages. False where that cannot be told."""
    return _c.filesystem_type(fd) == _EXT4_MAGIC


@functools.cache
def _zero_digest(granularity: int) -> int:
    """The digest of a zero granule, as the manifest spells it (never 0)."""
    import xxhash

    return xxhash.xxh3_64_intdigest(bytes(granularity)) or 1


_BAD_EXTENTS = "extents must have offset, length >= 0 and end before 2**63"


def merge_touching_pairs(extents: list[Extent]) -> list[Extent]:
    """:func:`blockmirror.extents.merge_touching` on pairs (checked as
    ``as_extent_array`` checks them): empty ones dropped, touching ones
    merged, order kept."""
    out: list[Extent] = []
    for offset, length in extents:
        if offset < 0 or length < 0 or offset + length > 2**63 - 1:
            raise ValueError(_BAD_EXTENTS)
        if length == 0:
            continue
        if out and out[-1][0] + out[-1][1] == offset:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((offset, length))
    return out


def split_pairs(extents: list[Extent], item_bytes: int, align: int = 1) -> list[list[Extent]]:
    """:func:`blockmirror.extents.split_extents` on pairs, without numpy:
    the extents laid end to end and cut every ITEM_BYTES, a cut inside an
    extent moved down to a multiple of ALIGN in file offsets (not below the
    extent's start); empty pieces dropped. Each item is a non-empty list."""
    if item_bytes <= 0 or align <= 0:
        raise ValueError(f"item_bytes and align must be > 0, got {item_bytes}, {align}")
    ext = [(o, n) for o, n in extents if n > 0]
    if sum(n for _, n in ext) <= item_bytes:
        return [ext] if ext else []
    items: list[list[Extent]] = []
    last_item = -1
    laid = 0  # where this extent starts, laid end to end
    for offset, length in ext:
        first, last = laid // item_bytes, (laid + length - 1) // item_bytes
        begins = [offset]
        for k in range(first + 1, last + 1):
            cut = offset + (k * item_bytes - laid)
            begins.append(max(cut - cut % align, offset))
        ends = [*begins[1:], offset + length]
        for k, begin, end in zip(range(first, last + 1), begins, ends, strict=True):
            if end <= begin:
                continue
            if k != last_item:
                items.append([])
                last_item = k
            items[-1].append((begin, end - begin))
        laid += length
    return items
