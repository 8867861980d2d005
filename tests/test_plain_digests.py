"""A new copy's digest table without numpy (issue 11): what the bulk pass
learns from its items, held in plain arrays, must be exactly the table the
numpy path builds - same canonical body, byte for byte - whatever the items'
cuts, the slots C left empty, zero granules and a short last granule."""

from __future__ import annotations

import random

import pytest

from blockmirror._bindings import copy as _c
from blockmirror.copying.copier import DigestRequest
from blockmirror.migration import digests as dg

G = 65536


def _request(items: list[list[tuple[int, int]]], rng: random.Random, size: int
             ) -> DigestRequest:
    """Items of pairs with slots as C fills them: a digest, the zero digest
    (a hole), or 0 (not seen whole) - and 0 always where a granule is cut."""
    request = DigestRequest(G)
    for item in items:
        count = _c.slot_count(item, G)
        slots = _c.new_digest_slots(count)
        i = 0
        for offset, length in item:
            if length <= 0:
                continue
            for k in range(offset // G, -(-(offset + length) // G)):
                whole = offset <= k * G and (k + 1) * G <= min(offset + length, size)
                roll = rng.random()
                if whole and roll < 0.2:
                    slots[i] = dg.zero_digest(G)
                elif whole and roll < 0.9:
                    slots[i] = rng.randrange(2, 2**64)
                i += 1
        request.found.append((item, slots))
    return request


def _split(extents: list[tuple[int, int]], rng: random.Random) -> list[list[tuple[int, int]]]:
    """EXTENTS cut at random byte offsets into items (as a copier may)."""
    cut: list[tuple[int, int]] = []
    for offset, length in extents:
        while length > 1 and rng.random() < 0.3:
            step = rng.randrange(1, length)
            cut.append((offset, step))
            offset, length = offset + step, length - step
        cut.append((offset, length))
    items: list[list[tuple[int, int]]] = []
    for extent in cut:
        if not items or rng.random() < 0.4:
            items.append([])
        items[-1].append(extent)
    rng.shuffle(items)  # workers finish in any order
    return items


def _extents(rng: random.Random, granules: int, size: int) -> list[tuple[int, int]]:
    out, k = [], 0
    while k < granules:
        k += rng.randrange(0, 6)
        run = rng.randrange(1, 8)
        if k < granules:
            end = min(size, (k + run) * G)
            out.append((k * G, end - k * G))
        k += run + 1
    return out


@pytest.mark.parametrize("seed", range(40))
def test_the_plain_table_is_the_numpy_one(seed: int) -> None:
    rng = random.Random(seed)
    size = rng.randrange(1, 200) * G + rng.choice([0, 0, 1, 4095, G - 1])
    granules = -(-size // G)
    touched = _extents(rng, granules, size)
    items = _split(touched, rng)
    plain = dg.DigestTable(G, size)
    plain.learn(_request(items, random.Random(seed), size), touched)
    assert plain.plain  # no numpy on this path
    numpy_table = dg.DigestTable(G, size)
    assert not len(numpy_table.unknown)  # looked at: no longer pristine, the numpy path
    numpy_table.learn(_request(items, random.Random(seed), size), touched)
    assert not numpy_table.plain
    assert plain.body() == numpy_table.body()
    assert plain.unknown_extents() == numpy_table.unknown_extents()
    assert plain.checksum() == numpy_table.checksum()

    # A few granules read back (the commit's record), then numpy takes over.
    picks = sorted(rng.sample(range(granules), min(granules, 5)))
    found = [(k, rng.choice([dg.zero_digest(G), rng.randrange(2, 2**64)])) for k in picks]
    if picks and size % G and picks[-1] == granules - 1:
        found[-1] = (found[-1][0], dg.zero_digest(size % G))  # a short zero granule
    plain.put_plain(found)
    assert plain.plain
    import numpy as np

    numpy_table.put(np.array([k for k, _ in found], dtype=np.int64),
                    np.array([v for _, v in found], dtype=np.uint64))
    assert plain.body() == numpy_table.body()
    assert plain.keys.tolist() == numpy_table.keys.tolist()  # converted on first use
    assert not plain.plain
    assert plain.unknown.tolist() == numpy_table.unknown.tolist()
    assert plain.body() == numpy_table.body()


def test_a_request_of_arrays_takes_the_numpy_path() -> None:
    import numpy as np

    table = dg.DigestTable(G, 4 * G)
    request = DigestRequest(G)
    request.found.append((np.array([1, 2], dtype=np.int64),
                          np.array([7, 8], dtype=np.uint64)))
    table.learn(request, [(G, 2 * G)])
    assert not table.plain
    assert table.keys.tolist() == [1, 2] and table.values.tolist() == [7, 8]
