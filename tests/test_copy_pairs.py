"""The local copier's numpy-free path (issue 11, the fixed cost of a sync).

Handed ``(offset, length)`` pairs, the local Copier merges and cuts them into
work items in plain Python and hands C the pairs' words, so a bulk copy
starts before numpy is loaded. The numpy versions (``merge_touching``,
``split_extents``, ``digest_slots``, ``dg.granule_runs``) are the slow twins
here: the pairs path must cut and digest exactly as they do.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockmirror._bindings import copy as _c
from blockmirror.copying.copier import (
    Copier,
    DigestRequest,
    merge_touching_pairs,
    split_pairs,
)
from blockmirror.extents import as_extent_array, merge_touching, pairs, split_extents
from blockmirror.migration import digests as dg
from blockmirror.migration.passes import _granule_aligned

KiB, MiB = 1 << 10, 1 << 20

# Sorted extents that may touch, with empty ones among them.
extent_lists = st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 3000)), max_size=25).map(
    lambda gaps: [(sum(g + n for g, n in gaps[:i]) + gaps[i][0], gaps[i][1])
                  for i in range(len(gaps))])


@given(extent_lists)
def test_merge_touching_pairs_is_merge_touching(extents):
    assert merge_touching_pairs(extents) == pairs(merge_touching(as_extent_array(extents)))


@given(extent_lists, st.integers(1, 9000), st.sampled_from([1, 512, 4096]))
def test_split_pairs_cuts_as_split_extents(extents, item_bytes, align):
    merged = merge_touching_pairs(extents)
    expected = [pairs(item) for item in split_extents(as_extent_array(merged), item_bytes, align)]
    assert split_pairs(merged, item_bytes, align) == expected


@given(extent_lists, st.sampled_from([512, 4096, 65536]))
def test_slot_count_is_digest_slots_length(extents, granularity):
    assert _c.slot_count(extents, granularity) == len(
        _c.digest_slots(as_extent_array(extents), granularity))


@given(st.lists(st.tuples(st.integers(0, 1 << 22), st.integers(0, 1 << 20)), max_size=12),
       st.sampled_from([4096, 65536]), st.integers(1, 1 << 23))
def test_granule_aligned_is_granule_runs_then_byte_extents(extents, granularity, size):
    granules = -(-size // granularity)
    runs = dg.granule_runs(extents, granularity, granules)
    assert _granule_aligned(extents, granularity, size) == dg.byte_extents(runs, granularity,
                                                                            size)


def test_bad_pairs_are_refused_as_arrays_are():
    for bad in ([(-1, 5)], [(0, -5)], [(2**63 - 10, 20)]):
        with pytest.raises(ValueError):
            merge_touching_pairs(bad)
        with pytest.raises(ValueError):
            as_extent_array(bad)


@pytest.mark.skipif(_c.digest_function() is None,
                    reason="xxhash's library does not export XXH3_64bits")
def test_pairs_and_arrays_copy_and_digest_the_same(tmp_path: Path):
    """The same extents handed as pairs and as an array: the same bytes in
    the copy, the same counts, the same digests."""
    rng = random.Random(5)
    size = 24 * MiB + 3 * KiB
    src = tmp_path / "src"
    with open(src, "wb") as f:
        f.truncate(size)
        for _ in range(20):
            f.seek(rng.randrange(0, size - 300 * KiB) // 4096 * 4096)
            f.write(rng.randbytes(rng.randrange(1, 300) * KiB))
    sfd = os.open(src, os.O_RDONLY)
    results = []
    try:
        for form in ("pairs", "array"):
            dst = tmp_path / f"dst-{form}"
            dfd = os.open(dst, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                with Copier(sfd, dfd, workers=3, batch_bytes=2 * MiB) as c:
                    assert c.copies_pairs
                    found = c.allocated_extent_pairs()
                    assert found == pairs(c.allocated_extents())
                    extents = found if form == "pairs" else as_extent_array(found)
                    request = DigestRequest(64 * KiB)
                    stats = c.copy_extents(extents, dst_fresh=True, digests=request)
                os.ftruncate(dfd, size)
            finally:
                os.close(dfd)
            keys, values = request.take()
            assert dst.read_bytes() == src.read_bytes()
            stats.seconds = 0.0
            results.append((stats, keys.tolist(), values.tolist()))
    finally:
        os.close(sfd)
    assert results[0] == results[1]
    assert results[0][1], "some granules were digested"


def test_extent_words_are_checked():
    from array import array

    from blockmirror._bindings._ffi import extents_pointer, ffi

    assert extents_pointer(_c.pairs_array([])) == ffi.NULL
    assert extents_pointer(_c.pairs_array([(4096, 8192)])) != ffi.NULL
    with pytest.raises(ValueError):
        extents_pointer(array("Q", [1, 2, 3]))  # not pairs
    with pytest.raises(ValueError):
        extents_pointer(array("q", [1, 2]))  # not uint64
