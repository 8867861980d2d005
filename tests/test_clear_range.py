"""Tracker.clear_range against a few-line pure-Python reference."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from blockmirror import Tracker

G = 4096


def reference(size: int, dirty: set[int], offset: int, length: int) -> set[int]:
    granules = -(-size // G)
    end = min(offset + length, size)
    whole = {g for g in range(granules)
             if g * G >= offset and min((g + 1) * G, size) <= end}
    return dirty - whole


@given(data=st.data())
def test_clear_range_matches_reference(tmp_path_factory, data):
    size = data.draw(st.integers(1, 300 * G))
    granules = -(-size // G)
    dirty = set(data.draw(st.lists(st.integers(0, granules - 1), max_size=60)))
    offset = data.draw(st.integers(0, size + 3 * G))
    length = data.draw(st.integers(0, size + 3 * G))  # past the end: clipped
    img = tmp_path_factory.mktemp("cr") / "x.img"
    with open(img, "wb") as f:
        f.truncate(size)
    with Tracker.create(img, granularity=G) as t:
        for g in dirty:
            t.mark(g * G, 1)
        t.clear_range(offset, length)
        got = set()
        for off, n in t.dirty_extents():
            got.update(range(off // G, -(-(off + n) // G)))
    assert got == reference(size, dirty, offset, length)
