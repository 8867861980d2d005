"""Byte extents, the vocabulary every layer shares: ``(offset, length)``.

Two spellings of the same thing: the C core, the tracker and the copier hand
extents around as numpy structured arrays (``EXTENT_DTYPE``, the layout of
``bm_extent``); the passes and checks above them reason with sorted lists of
pairs. This module is the one home of both and of every operation on them:
conversion, merging, union, subtraction and cutting into work items.

numpy is imported on first use, not with this module: it costs ~40 ms of
start-up, which the light commands (``track status``, ``verify`` of sparse
images, ``--help``) should not pay. ``EXTENT_DTYPE``, ``ExtentArray`` and
``Extents`` load it when first looked up (PEP 562); the functions here load
it when they are first handed an array.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, TypeAlias, cast

Extent = tuple[int, int]

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    EXTENT_DTYPE: np.dtype[np.void]
    """The layout of ``bm_extent``: what every extent array holds."""

    ExtentArray: TypeAlias = npt.NDArray[np.void]
    """A structured array with uint64 fields ``offset`` and ``length``."""

    Extents: TypeAlias = ExtentArray | Iterable[Extent]
    """What the copier accepts: an extent array, or ``(offset, length)`` pairs."""

_MAX_OFFSET = 2**63 - 1


def _numpy_names() -> dict[str, Any]:
    import numpy as np
    import numpy.typing as npt

    array = npt.NDArray[np.void]
    return {"EXTENT_DTYPE": np.dtype([("offset", np.uint64), ("length", np.uint64)]),
            "ExtentArray": array, "Extents": array | Iterable[Extent]}


def __getattr__(name: str) -> Any:
    if name not in ("EXTENT_DTYPE", "ExtentArray", "Extents"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals().update(_numpy_names())
    return globals()[name]


def _extent_dtype() -> np.dtype[np.void]:
    dtype: np.dtype[np.void] | None = globals().get("EXTENT_DTYPE")
    return __getattr__("EXTENT_DTYPE") if dtype is None else dtype


def is_extent_array(extents: object) -> bool:
    """EXTENTS is a numpy array (without importing numpy: a program that
    has not imported it holds none)."""
    # No ndarray yet while numpy's import runs on another thread (see
    # blockmirror._numpy): nobody can hold an array then either.
    ndarray = getattr(sys.modules.get("numpy"), "ndarray", None)
    return ndarray is not None and isinstance(extents, ndarray)


def pairs(extents: Extents) -> list[Extent]:
    """EXTENTS (a structured array or an iterable of pairs) as a list of ints."""
    if is_extent_array(extents):
        arr = cast("ExtentArray", extents)
        return list(zip(arr["offset"].tolist(), arr["length"].tolist(), strict=True))
    return [(int(o), int(n)) for o, n in extents]


def total_bytes(extents: Extents) -> int:
    """The bytes EXTENTS cover, counted with overlaps."""
    if is_extent_array(extents):
        import numpy as np

        arr = cast("ExtentArray", extents)
        return int(arr["length"].sum(dtype=np.uint64)) if len(arr) else 0
    return sum(int(n) for _, n in extents)


def as_extent_array(extents: Extents) -> ExtentArray:
    """EXTENTS as a C-contiguous ``EXTENT_DTYPE`` array, checked.

    Accepts an extent array (any structured array with ``offset`` and
    ``length`` fields) or an iterable of ``(offset, length)`` pairs.
    Raises ValueError for a negative value or a range ending past 2**63 - 1.
    """
    import numpy as np

    bad = "extents must have offset, length >= 0 and end before 2**63"
    if isinstance(extents, np.ndarray) and extents.dtype == _extent_dtype():
        arr: ExtentArray = np.ascontiguousarray(extents)
        if len(arr):
            # Each below 2**63, so their uint64 sum cannot wrap.
            if max(int(arr["offset"].max()), int(arr["length"].max())) > _MAX_OFFSET:
                raise ValueError(bad)
            if int((arr["offset"] + arr["length"]).max()) > _MAX_OFFSET:
                raise ValueError(bad)
        return arr
    offsets: list[int] = []
    lengths: list[int] = []
    for offset, length in pairs(extents):
        if offset < 0 or length < 0 or offset + length > _MAX_OFFSET:
            raise ValueError(bad)
        offsets.append(offset)
        lengths.append(length)
    arr = np.empty(len(offsets), dtype=_extent_dtype())
    arr["offset"] = offsets
    arr["length"] = lengths
    return arr


def merge_touching(extents: ExtentArray) -> ExtentArray:
    """EXTENTS with runs of touching extents (one ending where the next
    starts) merged into one, so no work item boundary splits a range that
    is really contiguous. Empty extents are dropped; order is kept."""
    import numpy as np

    ext = extents[extents["length"] > 0]
    if len(ext) < 2:
        return np.ascontiguousarray(ext)
    ends = ext["offset"] + ext["length"]
    touching = ends[:-1] == ext["offset"][1:]
    if not touching.any():
        return np.ascontiguousarray(ext)
    starts = np.flatnonzero(np.concatenate(([True], ~touching)))
    last = np.concatenate((starts[1:], [len(ext)])) - 1
    out = np.empty(len(starts), dtype=_extent_dtype())
    out["offset"] = ext["offset"][starts]
    out["length"] = ends[last] - out["offset"]
    return out


def split_extents(extents: ExtentArray, item_bytes: int, align: int = 1) -> list[ExtentArray]:
    """Cut EXTENTS into work items of about ITEM_BYTES each, in order.

    The extents are laid end to end and cut every ITEM_BYTES; an extent
    crossing a cut is split there. With ALIGN > 1 such a split is moved down
    to a multiple of ALIGN in file offsets (within the extent), so zero runs
    on both sides of it are punched in whole blocks; an item then holds up to
    ALIGN - 1 bytes more or less. Empty extents are dropped. Each item is a
    non-empty contiguous array.
    """
    import numpy as np

    if item_bytes <= 0 or align <= 0:
        raise ValueError(f"item_bytes and align must be > 0, got {item_bytes}, {align}")
    ext = extents[extents["length"] > 0]
    if len(ext) == 0:
        return []
    lengths = ext["length"].astype(np.uint64)
    ends = np.cumsum(lengths, dtype=np.uint64)
    if int(ends[-1]) <= item_bytes:
        return [np.ascontiguousarray(ext)]
    starts = ends - lengths
    size = np.uint64(item_bytes)
    first = starts // size
    count = ((ends - np.uint64(1)) // size - first + np.uint64(1)).astype(np.int64)
    owner = np.repeat(np.arange(len(ext)), count)
    within = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
    item = first[owner] + within.astype(np.uint64)
    piece_start = np.maximum(starts[owner], item * size)
    piece_end = np.minimum(ends[owner], (item + np.uint64(1)) * size)
    ext_offset = ext["offset"][owner]
    file_start = ext_offset + (piece_start - starts[owner])
    file_end = ext_offset + (piece_end - starts[owner])
    if align > 1:
        interior = piece_start > starts[owner]  # a cut inside an extent
        step = np.uint64(align)
        snapped = np.maximum(file_start - file_start % step, ext_offset)
        file_start = np.where(interior, snapped, file_start)
        # Each piece now ends where the next piece of its extent starts.
        same_next = np.zeros(len(owner), dtype=bool)
        same_next[:-1] = owner[1:] == owner[:-1]
        next_start = np.empty_like(file_start)
        next_start[:-1] = file_start[1:]
        next_start[-1:] = file_end[-1:]
        file_end = np.where(same_next, next_start, file_end)
    pieces = np.empty(len(owner), dtype=_extent_dtype())
    pieces["offset"] = file_start
    pieces["length"] = file_end - file_start
    keep = pieces["length"] > 0
    pieces, item = pieces[keep], item[keep]
    cuts = np.flatnonzero(np.diff(item)) + 1
    return [part for part in np.split(pieces, cuts) if len(part)]


def union(*groups: Iterable[Extent]) -> list[Extent]:
    """Sorted, merged extents covering everything any group covers."""
    merged: list[Extent] = []
    for off, length in sorted(e for group in groups for e in group):
        if merged and off <= merged[-1][0] + merged[-1][1]:
            last_off, last_len = merged[-1]
            merged[-1] = (last_off, max(last_off + last_len, off + length) - last_off)
        else:
            merged.append((off, length))
    return merged


def intersect(a: list[Extent], b: list[Extent]) -> list[Extent]:
    """Parts covered by both A and B (each sorted, non-overlapping)."""
    return subtract(a, subtract(a, b))


def subtract(extents: list[Extent], holes: list[Extent]) -> list[Extent]:
    """Parts of EXTENTS not covered by HOLES (both sorted, non-overlapping)."""
    out: list[Extent] = []
    j = 0
    for off, length in extents:
        pos, end = off, off + length
        while j < len(holes) and holes[j][0] + holes[j][1] <= pos:
            j += 1
        k = j
        while pos < end:
            if k < len(holes) and holes[k][0] <= pos:
                pos = max(pos, holes[k][0] + holes[k][1])
                k += 1
                continue
            stop = min(holes[k][0] if k < len(holes) else end, end)
            if stop > pos:
                out.append((pos, stop - pos))
            pos = stop
    return out
