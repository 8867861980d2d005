"""A sparse table of per-granule digests: what a manifest knows about a copy.

Every granule of the copy is in one of three states:

- **zero**: the copy reads as zeros there (the default: a new copy starts as
  one hole, and a sparse image is mostly holes);
- **unknown**: nothing is known (the copy is being rewritten there, or a
  crash may have left anything);
- **digest**: the xxh3-64 of the granule's bytes, as recorded.

Only unknown and digest granules cost memory: unknown ones as sorted,
disjoint runs of granule indices (a run costs 16 bytes whatever its length),
digests as sorted parallel arrays of granule index and digest (16 bytes per
granule). So a 15 TiB image holding 64 MiB of data costs what its data does,
not what its size does.

A digest equal to the digest of a zero granule is kept as *zero*, so each
granule has exactly one spelling (the checksum of the table does not depend
on how a zero granule became zero).

A new copy's table is held in plain Python arrays, in that same canonical
form, from its bulk pass (:meth:`DigestTable.learn`) to its manifest's
commit: a fresh sync never imports numpy (~45 ms of its start). The first
operation that needs more converts it to numpy arrays.
"""

from __future__ import annotations

import array
import bisect
import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeAlias

import xxhash

from blockmirror.extents import subtract as subtract_extents

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from blockmirror.copying.copier import DigestRequest

    U64: TypeAlias = npt.NDArray[np.uint64]
    Runs: TypeAlias = npt.NDArray[np.int64]  # shape (n, 2): [start, end) granule indices
else:
    # numpy loads on first use: a sync's bulk copy runs before it is needed
    # (see blockmirror._numpy).
    from blockmirror._numpy import np

UNKNOWN = 0  # the digest value that says nothing; real digests are never 0


def digest(block: bytes | memoryview) -> int:
    """The granule digest: xxh3-64, never UNKNOWN."""
    return xxhash.xxh3_64_intdigest(block) or 1


def no_runs() -> Runs:
    return np.zeros((0, 2), dtype=np.int64)


def _covers(runs: Runs, points: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
    """For each point, whether a run covers it."""
    if len(runs) == 0:
        return np.zeros(len(points), dtype=bool)
    i = np.searchsorted(runs[:, 0], points, side="right") - 1
    inside = i >= 0
    inside[inside] = points[inside] < runs[i[inside], 1]
    return inside


def _combine(a: Runs, b: Runs, keep_a: bool, keep_b: bool, keep_both: bool) -> Runs:
    """The runs covering the elementary pieces whose cover (by A, by B) is
    kept: union, subtraction and intersection in one sweep."""
    if len(a) == 0 and len(b) == 0:
        return no_runs()
    # Sorted and deduplicated by hand: np.unique (numpy 2.4) imports numpy.ma
    # on its first call, ~30 ms of every sync.
    points = np.sort(np.concatenate((a.ravel(), b.ravel())))
    points = points[np.concatenate(([True], points[1:] != points[:-1]))]
    if len(points) < 2:
        return no_runs()
    starts = points[:-1]
    in_a, in_b = _covers(a, starts), _covers(b, starts)
    keep = (in_a & ~in_b & keep_a) | (~in_a & in_b & keep_b) | (in_a & in_b & keep_both)
    return _merge(starts[keep], points[1:][keep])


def _merge(starts: npt.NDArray[np.int64], ends: npt.NDArray[np.int64]) -> Runs:
    """Sorted, merged runs from pieces sorted by start (touching ones join)."""
    if len(starts) == 0:
        return no_runs()
    reach = np.maximum.accumulate(ends)
    fresh = np.empty(len(starts), dtype=bool)
    fresh[0] = True
    fresh[1:] = starts[1:] > reach[:-1]
    first = np.flatnonzero(fresh)
    last = np.append(first[1:] - 1, len(starts) - 1)
    return np.stack((starts[first], reach[last]), axis=1).astype(np.int64)


def union(a: Runs, b: Runs) -> Runs:
    return _combine(a, b, True, True, True)


def subtract(a: Runs, b: Runs) -> Runs:
    return _combine(a, b, True, False, False)


def intersect(a: Runs, b: Runs) -> Runs:
    return _combine(a, b, False, False, True)


def runs_of_keys(keys: npt.NDArray[np.int64]) -> Runs:
    """Runs covering exactly the sorted, unique granule indices KEYS."""
    if len(keys) == 0:
        return no_runs()
    keys = keys.astype(np.int64, copy=False)
    breaks = np.flatnonzero(np.diff(keys) != 1) + 1
    first = np.concatenate(([0], breaks))
    last = np.concatenate((breaks, [len(keys)])) - 1
    return np.stack((keys[first], keys[last] + 1), axis=1)


def keys_of_runs(runs: Runs) -> npt.NDArray[np.int64]:
    """Every granule index the runs cover (for runs known to be small)."""
    if len(runs) == 0:
        return np.zeros(0, dtype=np.int64)
    lengths = runs[:, 1] - runs[:, 0]
    offsets = np.repeat(runs[:, 0] - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
    return np.arange(int(lengths.sum()), dtype=np.int64) + offsets


def granule_runs(extents: Iterable[tuple[int, int]], granularity: int, granules: int) -> Runs:
    """The granules byte EXTENTS touch (rounded out), clipped to GRANULES."""
    pieces = [(int(o) // granularity, min(granules, -(-(int(o) + int(n)) // granularity)))
              for o, n in extents if n > 0]
    pieces = [(s, e) for s, e in pieces if s < e]
    if not pieces:
        return no_runs()
    arr = np.array(sorted(pieces), dtype=np.int64)
    return _merge(arr[:, 0], arr[:, 1])


def byte_extents(runs: Runs | list[tuple[int, int]], granularity: int, size: int
                 ) -> list[tuple[int, int]]:
    """Granule runs as byte extents, the last clipped to SIZE."""
    out = []
    for s, e in runs if isinstance(runs, list) else runs.tolist():
        offset = s * granularity
        end = min(size, e * granularity)
        if end > offset:
            out.append((offset, end - offset))
    return out


class DigestTable:
    """The digests of a copy of SIZE bytes in GRANULARITY granules (see the
    module docstring). Not thread-safe: callers update it from one thread."""

    def __init__(self, granularity: int, size: int) -> None:
        self.granularity = granularity
        self.size = size
        # Made on first use: a new copy's table exists before its bulk copy,
        # numpy need not (see blockmirror._numpy).
        self._unknown: Runs | None = None
        self._keys: npt.NDArray[np.int64] | None = None
        self._values: U64 | None = None
        # Or, until something needs numpy, the table in plain arrays (a new
        # copy's, learnt from its bulk pass: see learn).
        self._plain: _Plain | None = None

    @property
    def pristine(self) -> bool:
        """Nothing recorded yet: every granule zero, as a new copy starts."""
        return (self._plain is None and self._unknown is None and self._keys is None
                and self._values is None)

    @property
    def plain(self) -> bool:
        """Whether the table is held without numpy (see learn)."""
        return self._plain is not None

    def _numpy_form(self) -> None:
        """Hold a plain table as numpy arrays from now on: the first use
        that needs numpy (a later pass, an update, a reader) converts it."""
        plain, self._plain = self._plain, None
        if plain is not None:
            self._unknown = np.array(plain.unknown, dtype=np.int64).reshape(-1, 2)
            self._keys = np.frombuffer(plain.keys, dtype=np.int64).copy()
            self._values = np.frombuffer(plain.values, dtype=np.uint64).copy()

    @property
    def unknown(self) -> Runs:
        """The runs of unknown granules."""
        self._numpy_form()
        if self._unknown is None:
            self._unknown = no_runs()
        return self._unknown

    @unknown.setter
    def unknown(self, runs: Runs) -> None:
        self._numpy_form()
        self._unknown = runs

    @property
    def keys(self) -> npt.NDArray[np.int64]:
        """The granules holding data, sorted (parallel to ``values``)."""
        self._numpy_form()
        if self._keys is None:
            self._keys = np.zeros(0, dtype=np.int64)
        return self._keys

    @keys.setter
    def keys(self, keys: npt.NDArray[np.int64]) -> None:
        self._numpy_form()
        self._keys = keys

    @property
    def values(self) -> U64:
        """The digests of ``keys``."""
        self._numpy_form()
        if self._values is None:
            self._values = np.zeros(0, dtype=np.uint64)
        return self._values

    @values.setter
    def values(self, values: U64) -> None:
        self._numpy_form()
        self._values = values

    @property
    def granules(self) -> int:
        return -(-self.size // self.granularity)

    def zero_digests(self, keys: npt.NDArray[np.int64]) -> U64:
        """The digest of a zero granule at each of KEYS (the last one may be short)."""
        g = self.granularity
        out = np.full(len(keys), _zero_digest(g), dtype=np.uint64)
        if self.size % g:
            out[keys == self.granules - 1] = _zero_digest(self.size % g)
        return out

    # -- changing it ----------------------------------------------------------

    def forget(self, runs: Runs) -> None:
        """The granules of RUNS become unknown."""
        if len(runs) == 0:
            return
        runs = intersect(runs, self._everything())
        self._drop_keys(runs)
        self.unknown = union(self.unknown, runs)

    def forget_all(self) -> None:
        self.keys, self.values = self.keys[:0], self.values[:0]
        self.unknown = self._everything()

    def set_zero(self, runs: Runs) -> None:
        """The copy reads as zeros over RUNS."""
        self._drop_keys(runs)
        self.unknown = subtract(self.unknown, runs)

    def put(self, keys: npt.NDArray[np.int64], values: U64) -> None:
        """Digests VALUES of granules KEYS (sorted, unique, in range; no
        value UNKNOWN). Zero-granule digests are kept as zero."""
        keys = np.asarray(keys, dtype=np.int64)
        values = np.asarray(values, dtype=np.uint64)
        if len(keys) == 0:
            return
        runs = runs_of_keys(keys)
        self.set_zero(runs)
        data = values != self.zero_digests(keys)
        keys, values = keys[data], values[data]
        merged = np.concatenate((self.keys, keys))
        order = np.argsort(merged, kind="stable")
        self.keys = merged[order]
        self.values = np.concatenate((self.values, values))[order]

    def resize(self, size: int) -> None:
        """Follow the copy's new SIZE: the old last granule (which grew or was
        cut) and every new granule become unknown."""
        if size == self.size:
            return
        old = self.granules
        self.size = size
        keep = np.array([[0, self.granules]], dtype=np.int64)
        self.unknown = intersect(self.unknown, keep)
        self._drop_keys(subtract(np.array([[0, max(old, self.granules)]]), keep))
        self.forget(np.array([[max(0, min(old, self.granules) - 1), self.granules]]))

    def _drop_keys(self, runs: Runs) -> None:
        if len(self.keys) and len(runs):
            stay = ~_covers(runs, self.keys)
            self.keys, self.values = self.keys[stay], self.values[stay]

    def _everything(self) -> Runs:
        n = self.granules
        return np.array([[0, n]], dtype=np.int64) if n else no_runs()

    # -- reading it -----------------------------------------------------------

    def get(self, keys: npt.NDArray[np.int64]) -> U64:
        """The digest each granule of KEYS (sorted) has: its recorded one,
        a zero granule's, or UNKNOWN."""
        keys = np.asarray(keys, dtype=np.int64)
        out = self.zero_digests(keys)
        if len(self.keys):
            i = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
            hit = self.keys[i] == keys
            out[hit] = self.values[i[hit]]
        out[_covers(self.unknown, keys)] = UNKNOWN
        return out

    def nonzero_runs(self) -> Runs:
        """Runs of every granule not known to be zero (unknown or data)."""
        return union(self.unknown, runs_of_keys(self.keys))

    def checksum(self) -> str:
        """xxh3-64 over the canonical form: what a stored table must hash to."""
        return xxhash.xxh3_64_hexdigest(self.body()[0])

    def body(self) -> tuple[bytes, int, int]:
        """The canonical form as a manifest body stores it (the unknown runs,
        the data granules, their digests; little-endian uint64), with the
        number of unknown runs and of data granules."""
        plain = self._plain
        if plain is None:
            raw = b"".join(np.ascontiguousarray(part).astype("<u8").tobytes()
                           for part in (self.unknown, self.keys, self.values))
            return raw, len(self.unknown), len(self.keys)
        words = array.array("Q", [bound for run in plain.unknown for bound in run])
        parts = [words, array.array("Q", plain.keys.tobytes()), plain.values]
        if sys.byteorder != "little":
            parts = [array.array("Q", part) for part in parts]
            for part in parts:
                part.byteswap()
        return b"".join(part.tobytes() for part in parts), len(plain.unknown), len(plain.keys)

    def unknown_extents(self) -> list[tuple[int, int]]:
        """Byte extents of the unknown granules."""
        runs = self._plain.unknown if self._plain is not None else self.unknown.tolist()
        return byte_extents(runs, self.granularity, self.size)

    # -- learning a pass's digests ----------------------------------------------

    def learn(self, request: DigestRequest, touched: list[tuple[int, int]] | None) -> None:
        """What a pass copied: the byte ranges TOUCHED become unknown (a new
        copy's table, which nothing reads meanwhile; None: the caller forgot
        them before the copy, durably), then take the digests REQUEST
        collected from the copy's buffers. A pristine table learning from
        items of pairs (a new copy's bulk pass) does it without numpy."""
        if not (touched is not None and self.pristine and self._learn_plain(touched, request)):
            if touched is not None:
                self.forget(granule_runs(touched, self.granularity, self.granules))
            keys, values = request.take()
            inside = keys < self.granules  # the source may have shrunk meanwhile
            self.put(keys[inside], values[inside])

    def _learn_plain(self, touched: list[tuple[int, int]], request: DigestRequest) -> bool:
        """:meth:`learn` on a pristine table, without numpy; False (nothing
        done) where the request holds anything but items of pairs."""
        if not all(isinstance(item, list) for item, _ in request.found):
            return False
        n, g = self.granules, self.granularity
        pieces = sorted((_digested(item, slots, g, n, self._zero_of) for item, slots
                         in request.found), key=lambda piece: piece[0])
        plain = _Plain()
        seen: list[tuple[int, int]] = []  # granules given a digest (zero or not)
        for _, runs, keys, values in pieces:
            if len(keys) and len(plain.keys) and keys[0] <= plain.keys[-1]:
                return False  # items that overlap: not from one pass's split
            plain.keys.extend(keys)
            plain.values.extend(values)
            seen.extend(runs)
        wrote = _plain_runs(((o // g, min(n, -(-(o + m) // g))) for o, m in touched if m > 0))
        plain.unknown = _plain_subtract(wrote, _plain_runs(seen))
        request.found = []
        self._plain = plain
        return True

    def put_plain(self, found: list[tuple[int, int]]) -> None:
        """Digests of a few granules, (granule, digest) sorted by granule, into
        a plain table (see :meth:`plain`) without numpy."""
        plain = self._plain
        assert plain is not None
        for k, value in found:
            i = bisect.bisect_left(plain.keys, k)
            here = i < len(plain.keys) and plain.keys[i] == k
            if value == self._zero_of(k):
                if here:
                    del plain.keys[i], plain.values[i]
            elif here:
                plain.values[i] = value
            else:
                plain.keys.insert(i, k)
                plain.values.insert(i, value)
        plain.unknown = _plain_subtract(plain.unknown, _plain_runs((k, k + 1) for k, _ in found))

    def _zero_of(self, k: int) -> int:
        """The digest of granule K if it holds zeros (the last may be short)."""
        g = self.granularity
        short = self.size % g
        return _zero_digest(short if short and k == self.granules - 1 else g)


class _Plain:
    """A table in plain Python arrays, in its canonical form: the unknown
    runs (sorted, merged), the data granules (sorted) and their digests."""

    __slots__ = ("keys", "unknown", "values")

    def __init__(self) -> None:
        self.unknown: list[tuple[int, int]] = []
        self.keys = array.array("q")
        self.values = array.array("Q")


def _digested(item: list[tuple[int, int]], slots: Any, g: int, n: int,
              zero_of: Callable[[int], int]
              ) -> tuple[int, list[tuple[int, int]], array.array[int], array.array[int]]:
    """One copied item (pairs) and its digest SLOTS (see DigestRequest): its
    first granule, the runs of granules it digested (below N), and those
    holding data with their digests."""
    values = slots  # a cffi uint64_t[]: indexing it gives ints
    keys, digests = array.array("q"), array.array("Q")
    runs: list[tuple[int, int]] = []
    start = end = -1
    last = n - 1
    zero, last_zero = _zero_digest(g), zero_of(last)
    i = 0
    for offset, length in item:
        if length <= 0:
            continue
        first, stop = offset // g, -(-(offset + length) // g)
        for k in range(first, stop):
            value = values[i + k - first]
            if not value or k >= n:
                continue
            if k != end:
                if end > start:
                    runs.append((start, end))
                start = k
            end = k + 1
            if value != (zero if k != last else last_zero):
                keys.append(k)
                digests.append(value)
        i += stop - first
    if end > start:
        runs.append((start, end))
    head = item[0][0] // g if item else 0
    return head, runs, keys, digests


def _plain_runs(runs: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """RUNS ([start, end) pairs) sorted and merged, empty ones dropped."""
    out: list[tuple[int, int]] = []
    for s, e in sorted(runs):
        if s >= e:
            continue
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def _plain_subtract(a: list[tuple[int, int]], b: list[tuple[int, int]]
                    ) -> list[tuple[int, int]]:
    """Runs of A not covered by B (both sorted and merged)."""
    cut = subtract_extents([(s, e - s) for s, e in a], [(s, e - s) for s, e in b])
    return [(s, s + n) for s, n in cut]


_ZERO_CACHE: dict[int, int] = {}


def _zero_digest(length: int) -> int:
    found = _ZERO_CACHE.get(length)
    if found is None:
        found = _ZERO_CACHE[length] = digest(bytes(length))
    return found


def zero_digest(length: int) -> int:
    return _zero_digest(length)
