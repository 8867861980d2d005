"""Block-by-block comparison where one side (or both) is an NBD export or an
NFS file.

Two local files go to :func:`blockmirror.copying.verify.compare_files` (holes
skipped, compared in C). With an export the whole common range is read —
without block status an export's holes cannot be told from its data — in
chunks, one reader thread per connection, and each chunk is compared as
bytes; a chunk that differs is narrowed to the BLOCK-sized blocks that do.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from blockmirror.copying.endpoint import NbdUri, NfsUrl, parse
from blockmirror.copying.nfs import NfsFile
from blockmirror.copying.remote import NbdExport
from blockmirror.copying.verify import compare_files
from blockmirror.errors import InvalidInputError
from blockmirror.extents import Extent, union

if TYPE_CHECKING:
    import numpy as np
else:  # numpy on first use (see blockmirror._numpy)
    from blockmirror._numpy import np

CHUNK = 4 << 20

Reader = Callable[[int, int, int], bytes]
"""(worker index, nbytes, offset) -> bytes (zeros past a local file's end)."""


class _Side:
    """One side of a comparison: a local file, an export or an NFS file, and
    its readers."""

    def __init__(self, text: str, workers: int,
                 export: NbdExport | NfsFile | None = None) -> None:
        where = parse(text)
        self.name = str(where)
        self.export = export
        self.owned = export is None  # close() disconnects only what it connected
        self.fd = -1
        if isinstance(where, (NbdUri, NfsUrl)):
            self.export = export or _connect(where, workers)
            self.size = self.export.size
            self.lanes = self.export.connections
        else:
            if not os.path.isfile(where):
                raise InvalidInputError(f"{where} is not a regular file")
            self.fd = os.open(where, os.O_RDONLY | os.O_CLOEXEC)
            self.size = os.fstat(self.fd).st_size
            self.lanes = workers

    def read(self, lane: int, nbytes: int, offset: int) -> bytes:
        if self.export is not None:
            return self.export.pread(lane % self.lanes, nbytes, offset)
        data = os.pread(self.fd, nbytes, offset)
        return data + bytes(nbytes - len(data)) if len(data) < nbytes else data

    def close(self) -> None:
        if self.export is not None and self.owned:
            self.export.close()
        if self.fd >= 0:
            os.close(self.fd)


def _connect(where: NbdUri | NfsUrl, workers: int) -> NbdExport | NfsFile:
    if isinstance(where, NbdUri):
        return NbdExport(where, connections=workers)
    nfs_file = NfsFile(where, connections=workers)
    try:
        nfs_file.open_existing()
    except BaseException:
        nfs_file.close()
        raise
    return nfs_file


def _differing_blocks(a: bytes, b: bytes, offset: int, block: int) -> list[Extent]:
    """BLOCK-aligned extents (clipped to the chunk) where A and B differ."""
    if a == b:
        return []
    x = np.frombuffer(a, dtype=np.uint8)
    y = np.frombuffer(b, dtype=np.uint8)
    where = np.flatnonzero(x != y) + offset
    blocks = np.unique(where // block)
    end = offset + len(a)
    return union([(max(offset, int(k) * block), min(end, (int(k) + 1) * block)
                   - max(offset, int(k) * block)) for k in blocks])


def _chunks(size: int) -> Iterator[Extent]:
    for pos in range(0, size, CHUNK):
        yield pos, min(CHUNK, size - pos)


def compare_endpoints(a: str, b: str, *, block: int = 65536, workers: int = 4) -> list[Extent]:
    """Extents (BLOCK-aligned, merged) where A and B differ, each a local
    path, an NBD URI or an NFS URL; sizes that differ differ past the shorter."""
    if isinstance(parse(a), str) and isinstance(parse(b), str):
        return compare_files(a, b, block=block, workers=workers)
    side_a = _Side(a, workers)
    try:
        side_b = _Side(b, workers)
        try:
            return _compare_sides(side_a, side_b, block, workers)
        finally:
            side_b.close()
    finally:
        side_a.close()


def compare_with_export(path: str, export: NbdExport | NfsFile, *, block: int = 65536,
                        workers: int = 4) -> list[Extent]:
    """Like compare_endpoints for the local file PATH and an export (or an
    NFS file open for reading) already connected (a sync's: a server taking
    one client could not take more)."""
    local = _Side(path, workers)
    try:
        text = export.uri.uri if isinstance(export, NbdExport) else export.uri.url
        remote = _Side(text, workers, export)
        return _compare_sides(local, remote, block, workers)
    finally:
        local.close()


def _compare_sides(a: _Side, b: _Side, block: int, workers: int) -> list[Extent]:
    common = min(a.size, b.size)
    lanes = max(1, min(workers, a.lanes, b.lanes))
    items = list(_chunks(common))

    def compare_lane(lane: int) -> list[Extent]:
        found: list[Extent] = []
        for offset, length in items[lane::lanes]:
            found.extend(_differing_blocks(a.read(lane, length, offset),
                                           b.read(lane, length, offset), offset, block))
        return found

    differing: list[Extent] = []
    with ThreadPoolExecutor(max_workers=lanes) as pool:
        for found in pool.map(compare_lane, range(lanes)):
            differing.extend(found)
    if a.size != b.size:
        differing.append((common, max(a.size, b.size) - common))
    return union(differing)
