"""A Copier over an endpoint's connections: what the copiers into an NBD
export (remote.py: RemoteCopier), out of one (ExportReader) and into an NFS
file (nfs.py: NfsCopier) share.

Each worker thread keeps one connection of the endpoint for every work item
it copies, and each item is one C call with many requests in flight on it;
there is no local copier handle and no copy_file_range. The C calls' counts
are tallied here, and a digest request is turned into the C call's digest
sink here (the copies into an export and into an NFS file hash each whole
granule from the buffer its bytes were sent from).
"""

from __future__ import annotations

import itertools
import os
import threading
from typing import TYPE_CHECKING, Any, Protocol

from blockmirror._bindings import copy as _c
from blockmirror._bindings.optional import CopyCounts
from blockmirror.copying.copier import (
    DEFAULT_BATCH_BYTES,
    DEFAULT_BLOCK_SIZE,
    Copier,
    DigestRequest,
    _zero_digest,
)
from blockmirror.extents import Extent

if TYPE_CHECKING:
    from typing import TypeAlias

    import numpy as np
    import numpy.typing as npt

    from blockmirror.extents import ExtentArray

    DigestSpec: TypeAlias = tuple[Any, int, int, npt.NDArray[np.uint64]]
    """What an endpoint binding's copy_extents takes as DIGESTS: the C digest
    function, the granularity, the zero granule's digest, the slots it fills."""
else:  # on first use: a copy that hashes nothing never loads it (blockmirror._numpy)
    from blockmirror._numpy import np

MAX_HASHED_GRANULE = 1 << 20
"""The largest granule a connection copy hashes from its buffers: each request
buffer then holds a granule (REQUESTS of them per connection); coarser
granules are digested by the caller."""


def timeout_from_environment(variable: str, default: float = 30.0) -> float:
    """Seconds from the environment VARIABLE (at least 0.1), else DEFAULT."""
    try:
        return max(0.1, float(os.environ.get(variable, str(default))))
    except ValueError:
        return default


class Endpoint(Protocol):
    """What a connection copier needs of its endpoint."""

    name: str
    connections: int


class ConnectionCopier(Copier):
    """One worker thread per connection of ENDPOINT, each with up to
    REQUESTS (DEFAULT_REQUESTS when None) requests in flight per call.
    Subclasses make the C call in ``_copy_item_now`` on ``_connection()``
    and pass its counts to ``_tally``."""

    def __init__(self, endpoint: Endpoint, src_fd: int, dst_fd: int, *,
                 requests: int | None, default_requests: int,
                 batch_bytes: int = DEFAULT_BATCH_BYTES, block_size: int = DEFAULT_BLOCK_SIZE,
                 rate_limit: float | None = None, src_path: str | None = None,
                 dst_path: str | None = None) -> None:
        self.export = endpoint
        self.requests = max(1, requests or default_requests)
        super().__init__(src_fd, dst_fd, workers=endpoint.connections, batch_bytes=batch_bytes,
                         block_size=block_size, use_copy_file_range=False,
                         rate_limit=rate_limit, src_path=src_path, dst_path=dst_path)
        self._next_conn = itertools.count()
        self._stats_lock = threading.Lock()
        self.most_in_flight = 0
        """The most requests one connection had in flight at once so far."""
        self.requests_sent = 0

    def _new_handle(self, use_copy_file_range: bool) -> Any:
        return None  # the endpoint's connections are the handle

    @property
    def uses_copy_file_range(self) -> bool:
        return False

    def _connection(self) -> int:
        """This worker thread's connection (assigned on its first item)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = next(self._next_conn) % self.export.connections
        return int(conn)

    def _largest_hashed_granule(self) -> int:
        return MAX_HASHED_GRANULE

    @staticmethod
    def _digest_sink(item: ExtentArray, digests: DigestRequest | None, request_bytes: int
                     ) -> tuple[DigestSpec | None, int, npt.NDArray[np.int64] | None]:
        """For one C call over ITEM: the DIGESTS argument (None: no digests),
        the request size to use (whole granules per request buffer: powers
        of two, so the granule divides it) and the granule of each slot."""
        if digests is None:
            return None, request_bytes, None
        fn = _c.digest_function()
        assert fn is not None
        g = digests.granularity
        slots = _c.digest_slots(item, g)
        out = np.zeros(len(slots), dtype=np.uint64)
        return (fn, g, _zero_digest(g), out), max(request_bytes, g), slots

    @staticmethod
    def _take_digests(digests: DigestRequest | None, spec: DigestSpec | None,
                      slots: npt.NDArray[np.int64] | None) -> None:
        """Hand DIGESTS the granules the C call hashed whole (non-zero slots)."""
        if digests is None or spec is None or slots is None:
            return
        out = spec[3]
        whole = np.flatnonzero(out)
        digests.found.append((slots[whole], out[whole]))  # list.append: atomic

    def _tally(self, counts: CopyCounts) -> None:
        with self._stats_lock:
            self.most_in_flight = max(self.most_in_flight, counts.max_in_flight)
            self.requests_sent += counts.requests

    def whole_image(self) -> ExtentArray:
        """[0, the source's size): what a bulk pass into a remote copy covers
        where the copy's old content is unknown under the source's holes."""
        from blockmirror.extents import EXTENT_DTYPE

        return np.array(self.whole_image_pairs(), dtype=EXTENT_DTYPE)

    def whole_image_pairs(self) -> list[Extent]:
        """:meth:`whole_image` as pairs (no numpy)."""
        return [(0, os.fstat(self.src_fd).st_size)]
