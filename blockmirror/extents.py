"""Arithmetic on lists of byte extents: ``(offset, length)`` pairs.

The tracker, the copier and numpy hand extents around as structured arrays
(fields ``offset`` and ``length``); the passes and checks above them reason
with sorted lists of pairs. One home for the few operations they share.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

Extent = tuple[int, int]


def pairs(extents: Any) -> list[Extent]:
    """EXTENTS (a structured array or an iterable of pairs) as a list of ints."""
    if hasattr(extents, "dtype"):
        return list(zip(extents["offset"].tolist(), extents["length"].tolist(), strict=True))
    return [(int(o), int(n)) for o, n in extents]


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
