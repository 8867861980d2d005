"""Block-by-block comparison of two images.

Only ranges where at least one side holds data are read (SEEK_DATA/SEEK_HOLE;
a filesystem without them reports everything as data, which is still right),
several chunks in flight at once, and the answer is the list of differing
extents at BLOCK granularity, merged. Different sizes differ past the shorter.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

Extent = tuple[int, int]

CHUNK = 4 << 20


def data_extents(fd: int, size: int) -> list[Extent]:
    """(offset, length) of every data range of FD below SIZE."""
    out: list[Extent] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data past pos (EINVAL: lseek unsupported)
            if pos == 0 and not out:
                return [(0, size)] if _lseek_unsupported(fd) else []
            break
        if start >= size:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        out.append((start, end - start))
        pos = end
    return out


def _lseek_unsupported(fd: int) -> bool:
    try:
        os.lseek(fd, 0, os.SEEK_HOLE)
    except OSError:
        return True
    return False


def _union(a: list[Extent], b: list[Extent]) -> list[Extent]:
    merged: list[Extent] = []
    for off, length in sorted(a + b):
        if merged and off <= merged[-1][0] + merged[-1][1]:
            last_off, last_len = merged[-1]
            merged[-1] = (last_off, max(last_off + last_len, off + length) - last_off)
        else:
            merged.append((off, length))
    return merged


def _merge_adjacent(extents: list[Extent]) -> list[Extent]:
    out: list[Extent] = []
    for off, length in sorted(extents):
        if out and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((off, length))
    return out


def compare_files(path_a: str, path_b: str, *, block: int = 65536, workers: int = 4) -> list[
    Extent
]:
    """Extents (BLOCK-aligned, merged) where PATH_A and PATH_B differ."""
    fd_a = os.open(path_a, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fd_b = os.open(path_b, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return compare_fds(fd_a, fd_b, block=block, workers=workers)
        finally:
            os.close(fd_b)
    finally:
        os.close(fd_a)


def compare_fds(fd_a: int, fd_b: int, *, block: int = 65536, workers: int = 4) -> list[Extent]:
    size_a, size_b = os.fstat(fd_a).st_size, os.fstat(fd_b).st_size
    common = min(size_a, size_b)
    regions = _union(data_extents(fd_a, common), data_extents(fd_b, common))
    chunks: list[Extent] = []
    for off, length in regions:
        # Align to BLOCK so a difference is reported in whole blocks.
        start = off - off % block
        end = min(common, -(-(off + length) // block) * block)
        for pos in range(start, end, CHUNK):
            chunks.append((pos, min(CHUNK, end - pos)))

    def compare_chunk(chunk: Extent) -> list[Extent]:
        off, length = chunk
        a = _pread_full(fd_a, length, off)
        b = _pread_full(fd_b, length, off)
        if a == b:
            return []
        diffs = []
        for rel in range(0, length, block):
            if a[rel : rel + block] != b[rel : rel + block]:
                diffs.append((off + rel, min(block, length - rel)))
        return diffs

    differing: list[Extent] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for diffs in pool.map(compare_chunk, _dedupe(chunks)):
            differing.extend(diffs)
    if size_a != size_b:
        differing.append((common, max(size_a, size_b) - common))
    return _merge_adjacent(differing)


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


def _pread_full(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)
