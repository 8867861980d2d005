"""The verify kernel (csrc/compare.c, blockmirror/verify.py) against a
pure-Python twin: which BLOCK-aligned blocks of two byte strings differ over
a set of extents. Files are random, sparse or not, of equal or different
sizes; small scratch buffers force blocks to straddle two reads."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockmirror._bindings import compare as _compare
from blockmirror._bindings import copy as _copy
from blockmirror.copying.verify import compare_fds, compare_files
from blockmirror.extents import EXTENT_DTYPE

KiB = 1024


# -- pure-Python twins ---------------------------------------------------------


def merge(extents: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for off, length in extents:
        if out and out[-1][0] + out[-1][1] >= off:
            end = max(out[-1][0] + out[-1][1], off + length)
            out[-1] = (out[-1][0], end - out[-1][0])
        else:
            out.append((off, length))
    return out


def py_compare_extents(a: bytes, b: bytes, extents: list[tuple[int, int]],
                       block: int) -> list[tuple[int, int]]:
    """Blocks (aligned to offsets, clipped to their extent) where A and B differ;
    past a side's end it has no bytes, so it differs wherever the other has some."""
    diffs = []
    for off, length in extents:
        lo, hi = off, off + length
        pos = lo
        while pos < hi:
            end = min(hi, (pos // block + 1) * block)
            if a[pos:end] != b[pos:end]:
                diffs.append((pos, end - pos))
            pos = end
    return merge(diffs)


def py_compare_files(a: bytes, b: bytes, block: int) -> list[tuple[int, int]]:
    """What compare_files answers, without looking at holes: every block of the
    common length that differs, plus everything past the shorter one."""
    common = min(len(a), len(b))
    diffs = py_compare_extents(a, b, [(0, common)], block)
    if len(a) != len(b):
        diffs.append((common, max(len(a), len(b)) - common))
    return merge(diffs)


# -- strategies ----------------------------------------------------------------


def mutate(base: bytes, edits: list[tuple[int, int]]) -> bytes:
    out = bytearray(base)
    for pos, value in edits:
        if pos < len(out):
            out[pos] = value
    return bytes(out)


@st.composite
def file_pair(draw: st.DrawFn) -> tuple[bytes, bytes]:
    size = draw(st.integers(0, 40 * KiB))
    base = draw(st.sampled_from(["zeros", "random"]))
    content = bytes(size) if base == "zeros" else np.random.default_rng(
        draw(st.integers(0, 2**32 - 1))).bytes(size)
    edits = draw(st.lists(st.tuples(st.integers(0, max(0, size - 1)), st.integers(1, 255)),
                          max_size=6))
    other = mutate(content, edits)
    cut = draw(st.sampled_from([None, "a", "b"]))
    shorter = draw(st.integers(0, size)) if size else 0
    if cut == "a":
        content = content[:shorter]
    elif cut == "b":
        other = other[:shorter]
    return content, other


@st.composite
def sorted_extents(draw: st.DrawFn, end: int) -> list[tuple[int, int]]:
    cuts = sorted(set(draw(st.lists(st.integers(0, end), max_size=8))))
    pairs = list(zip(cuts[::2], cuts[1::2], strict=False))
    return [(lo, hi - lo) for lo, hi in pairs if hi > lo]


def write(path: Path, content: bytes, sparse: bool) -> None:
    """CONTENT at PATH; with SPARSE, runs of zero 4 KiB pages become holes."""
    with open(path, "wb") as f:
        if not sparse:
            f.write(content)
            return
        for pos in range(0, len(content), 4 * KiB):
            page = content[pos:pos + 4 * KiB]
            if any(page):
                f.seek(pos)
                f.write(page)
        f.truncate(len(content))


# -- the C call ----------------------------------------------------------------


@given(pair=file_pair(), data=st.data(),
       block=st.sampled_from([512, 4 * KiB, 16 * KiB]),
       buf_len=st.sampled_from([64, 1024, 3 * 1000, 8 * KiB, 64 * KiB]))
def test_compare_extents_matches_python(tmp_path_factory: pytest.TempPathFactory, pair,
                                        data: st.DataObject, block: int, buf_len: int) -> None:
    a, b = pair
    extents = data.draw(sorted_extents(max(len(a), len(b)) + 2 * KiB))
    d = tmp_path_factory.mktemp("cmp")
    write(d / "a", a, sparse=False)
    write(d / "b", b, sparse=False)
    fa, fb = os.open(d / "a", os.O_RDONLY), os.open(d / "b", os.O_RDONLY)
    try:
        arr = np.array(extents, dtype=EXTENT_DTYPE)
        got = _compare.compare_extents(fa, fb, arr, block, _copy.new_buffer(buf_len))
        got_pairs = [(int(o), int(n)) for o, n in got]
        assert got_pairs == py_compare_extents(a, b, extents, block)
        # Without a caller buffer the call allocates its own: same answer.
        again = _compare.compare_extents(fa, fb, arr, block)
        assert [(int(o), int(n)) for o, n in again] == got_pairs
    finally:
        os.close(fa)
        os.close(fb)


def test_compare_extents_reports_every_other_block(tmp_path: Path) -> None:
    """The worst case for the output array: alternate blocks differ."""
    block, blocks = 512, 257
    a = bytes(block * blocks)
    b = bytearray(a)
    for i in range(0, blocks, 2):
        b[i * block + 300] = 1
    write(tmp_path / "a", a, sparse=False)
    write(tmp_path / "b", bytes(b), sparse=False)
    fa, fb = os.open(tmp_path / "a", os.O_RDONLY), os.open(tmp_path / "b", os.O_RDONLY)
    try:
        # Unaligned ends: partial first and last blocks.
        arr = np.array([(100, len(a) - 200)], dtype=EXTENT_DTYPE)
        got = _compare.compare_extents(fa, fb, arr, block)
        assert [(int(o), int(n)) for o, n in got] == py_compare_extents(
            a, bytes(b), [(100, len(a) - 200)], block)
        assert len(got) == 129
    finally:
        os.close(fa)
        os.close(fb)


def test_compare_extents_errors_name_the_failing_side(tmp_path: Path) -> None:
    write(tmp_path / "a", b"x" * 8192, sparse=False)
    write(tmp_path / "b", b"x" * 8192, sparse=False)
    fa = os.open(tmp_path / "a", os.O_RDONLY)
    fb = os.open(tmp_path / "b", os.O_WRONLY)  # unreadable: EBADF on B's read
    try:
        arr = np.array([(0, 8192)], dtype=EXTENT_DTYPE)
        with pytest.raises(OSError) as info:
            _compare.compare_extents(fa, fb, arr, 4096, a_path="A", b_path="B")
        assert info.value.errno == errno.EBADF
        assert info.value.filename == "B"
        with pytest.raises(OSError) as info:
            _compare.compare_extents(fa, fa, arr, 3000)
        assert info.value.errno == errno.EINVAL
    finally:
        os.close(fa)
        os.close(fb)


# -- compare_files -------------------------------------------------------------


@given(pair=file_pair(), block=st.sampled_from([512, 4 * KiB, 64 * KiB]),
       sparse=st.booleans(), workers=st.sampled_from([1, 3]))
def test_compare_files_matches_python(tmp_path_factory: pytest.TempPathFactory, pair,
                                      block: int, sparse: bool, workers: int) -> None:
    a, b = pair
    d = tmp_path_factory.mktemp("cmpf")
    write(d / "a", a, sparse=sparse)
    write(d / "b", b, sparse=sparse)
    got = compare_files(str(d / "a"), str(d / "b"), block=block, workers=workers)
    assert got == py_compare_files(a, b, block)


def test_compare_files_many_items(tmp_path: Path) -> None:
    """Big enough for several work items per worker: differences anywhere are
    found and reported once, in order."""
    rng = np.random.default_rng(1)
    a = rng.bytes(9 << 20)
    b = bytearray(a)
    for pos in (0, 1 << 20, (1 << 20) + 65536, 5 << 20, len(a) - 1):
        b[pos] ^= 0xFF
    write(tmp_path / "a", a, sparse=False)
    write(tmp_path / "b", bytes(b), sparse=False)
    got = compare_files(str(tmp_path / "a"), str(tmp_path / "b"), workers=4)
    assert got == py_compare_files(a, bytes(b), 65536)
    assert compare_files(str(tmp_path / "a"), str(tmp_path / "a")) == []


def test_compare_fds_refuses_bad_blocks(tmp_path: Path) -> None:
    write(tmp_path / "a", b"x", sparse=False)
    fd = os.open(tmp_path / "a", os.O_RDONLY)
    try:
        for block in (0, 100, 3 * 4096, 1 << 25):
            with pytest.raises(ValueError):
                compare_fds(fd, fd, block=block)
    finally:
        os.close(fd)
