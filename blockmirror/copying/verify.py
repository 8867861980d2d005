"""Block-by-block comparison of two images.

Only ranges where at least one side holds data are read (SEEK_DATA/SEEK_HOLE;
a filesystem without them reports everything as data, which is still right),
several chunks in flight at once, and the answer is the list of differing
extents at BLOCK granularity, merged. Different sizes differ past the shorter.

The comparing itself is one C call per chunk (``bm_compare_extents``): it
reads both sides into a small cache-resident buffer and compares there
without the GIL, so the threads really run in parallel. (Python reads into
fresh 4 MiB bytes and a GIL-held ``==`` only matched ``qemu-img compare``.)
Extents travel as pairs, not numpy arrays: the lists are short, and the
command then starts without numpy's import.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

from blockmirror._bindings import compare as _compare
from blockmirror._bindings import copy as _copy
from blockmirror.extents import Extent, union

# Bytes per work item (one C call); big enough that the call overhead is
# nothing, small enough that every worker gets several.
CHUNK = 32 << 20
MIN_ITEM = 1 << 20


def compare_files(path_a: str, path_b: str, *, block: int = 65536, workers: int = 4) -> list[
    Extent
]:
    """Extents (BLOCK-aligned, merged) where PATH_A and PATH_B differ."""
    fd_a = os.open(path_a, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fd_b = os.open(path_b, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return compare_fds(fd_a, fd_b, block=block, workers=workers, path_a=path_a,
                               path_b=path_b)
        finally:
            os.close(fd_b)
    finally:
        os.close(fd_a)


def compare_fds(fd_a: int, fd_b: int, *, block: int = 65536, workers: int = 4,
                path_a: str | None = None, path_b: str | None = None) -> list[Extent]:
    """Extents (BLOCK-aligned, merged) where FD_A and FD_B differ. BLOCK is a
    power of two from 512 B to 16 MiB; PATH_A/PATH_B name the files in errors."""
    if block < _copy.MIN_BLOCK or block > _copy.MAX_BLOCK or block & (block - 1):
        raise ValueError(f"block {block} is not a power of two between "
                         f"{_copy.MIN_BLOCK} and {_copy.MAX_BLOCK}")
    size_a, size_b = os.fstat(fd_a).st_size, os.fstat(fd_b).st_size
    common = min(size_a, size_b)
    regions = union(_copy.data_extent_pairs(fd_a, common), _copy.data_extent_pairs(fd_b, common))
    # Align to BLOCK so a difference is reported in whole blocks.
    aligned = [(off - off % block, min(common, -(-(off + length) // block) * block))
               for off, length in regions]
    # Work items of CHUNK bytes, cut finer for small comparisons so every
    # worker gets a share; a multiple of BLOCK, so blocks stay whole.
    total = sum(end - start for start, end in aligned)
    limit = min(CHUNK, max(MIN_ITEM, -(-total // (4 * workers))))
    limit = max(block, limit - limit % block)
    chunks: list[Extent] = []
    for start, end in aligned:
        for pos in range(start, end, limit):
            chunks.append((pos, min(limit, end - pos)))

    local = threading.local()

    def compare_batch(batch: list[Extent]) -> list[Extent]:
        buf = getattr(local, "buf", None)
        if buf is None:  # one cache-sized scratch buffer per worker thread
            buf = local.buf = _copy.new_buffer(_compare.DEFAULT_BUFFER)
        return _compare.compare_pairs(fd_a, fd_b, batch, block, buf,
                                      a_path=path_a, b_path=path_b)

    differing: list[Extent] = []
    batches = list(_batches(_dedupe(chunks), limit))
    if len(batches) <= 1:  # a small or sparse pair: no pool (nor its import) to pay for
        for batch in batches:
            differing.extend(compare_batch(batch))
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=workers) as pool:
            for diffs in pool.map(compare_batch, batches):
                differing.extend(diffs)
    if size_a != size_b:
        differing.append((common, max(size_a, size_b) - common))
    return union(differing)


def _dedupe(chunks: list[Extent]) -> list[Extent]:
    """Block alignment can make neighbouring regions overlap; drop repeats."""
    out: list[Extent] = []
    covered = 0
    for off, length in sorted(chunks):
        if off + length <= covered:
            continue
        if off < covered:
            length -= covered - off
            off = covered
        out.append((off, length))
        covered = off + length
    return out


def _batches(chunks: list[Extent], limit: int) -> Iterator[list[Extent]]:
    """Consecutive CHUNKS grouped into work items of at most LIMIT bytes
    (a chunk is never split), so many small regions share one C call."""
    batch: list[Extent] = []
    total = 0
    for off, length in chunks:
        if batch and total + length > limit:
            yield batch
            batch, total = [], 0
        batch.append((off, length))
        total += length
    if batch:
        yield batch
