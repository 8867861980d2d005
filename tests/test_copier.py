"""The extent copy engine (csrc/copy.c, blockmirror/copier.py) against
pure-Python twins: a reference copy, a reference zero-detection count, a
SEEK_DATA walk, an all-zero check. Layouts are random sparse files."""

from __future__ import annotations

import errno
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from imagetools import nonzero_cells

from blockmirror._bindings import copy as _copy
from blockmirror.copying.copier import (
    Copier,
    CopyStats,
)
from blockmirror.extents import EXTENT_DTYPE, as_extent_array, merge_touching, split_extents

KiB = 1024
MiB = 1024 * KiB
FS_BLOCK = os.statvfs("/tmp").f_bsize


# -- pure-Python twins ---------------------------------------------------------


def py_data_extents(fd: int, end: int) -> list[tuple[int, int]]:
    """SEEK_DATA/SEEK_HOLE walk over [0, END)."""
    out = []
    pos = 0
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break
            raise
        if data >= end:
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        out.append((data, hole - data))
        pos = hole
    return out


def intersect(a: list[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, int]]:
    """Parts of the sorted extents A inside [LO, HI), as (start, end)."""
    out = []
    for off, length in a:
        s, e = max(off, lo), min(off + length, hi)
        if s < e:
            out.append((s, e))
    return out


def reference_copy(src: bytes, old_dst: bytes, extents: list[tuple[int, int]]) -> bytearray:
    """What the destination must read as: OLD_DST with every extent replaced
    by the source's bytes (zeros past the source's end)."""
    end = max([len(old_dst)] + [o + n for o, n in extents])
    out = bytearray(old_dst.ljust(end, b"\0"))
    for off, length in extents:
        out[off : off + length] = src[off : off + length].ljust(length, b"\0")
    return out


def reference_written_pieces(
    src: bytes, data: list[tuple[int, int]], extents: list[tuple[int, int]], block: int
) -> list[tuple[int, int]]:
    """The (start, end) pieces a single read-path call writes: each extent is
    cut by the source's data segments and by the block grid; pieces holding
    a nonzero byte are written, all others are not."""
    pieces = []
    for off, length in extents:
        for s, e in intersect(data, off, min(off + length, len(src))):
            pos = s
            while pos < e:
                cell_end = min((pos // block + 1) * block, e)
                if any(src[pos:cell_end]):
                    pieces.append((pos, cell_end))
                pos = cell_end
    return pieces


def allocated_blocks(path: Path) -> set[int]:
    """Indexes of FS_BLOCK-sized blocks of PATH that hold data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        blocks: set[int] = set()
        for off, length in py_data_extents(fd, size):
            blocks.update(range(off // FS_BLOCK, (off + length - 1) // FS_BLOCK + 1))
        return blocks
    finally:
        os.close(fd)


def blocks_touching(ranges: list[tuple[int, int]]) -> set[int]:
    out: set[int] = set()
    for s, e in ranges:
        if s < e:
            out.update(range(s // FS_BLOCK, (e - 1) // FS_BLOCK + 1))
    return out


def blocks_inside(ranges: list[tuple[int, int]]) -> set[int]:
    """FS blocks wholly inside the union of RANGES (start, end)."""
    merged: list[list[int]] = []
    for s, e in sorted(ranges):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    out: set[int] = set()
    for s, e in merged:
        first = -(-s // FS_BLOCK)
        out.update(range(first, e // FS_BLOCK))
    return out


# -- making files ----------------------------------------------------------------

SEGMENT = st.tuples(
    st.sampled_from(["hole", "hole", "zeros", "data", "speckled"]),
    st.integers(1, 96 * KiB),
    st.integers(0, 2**32 - 1),
)


def write_layout(path: Path, segments: list[tuple[str, int, int]]) -> bytes:
    """Write a sparse file made of SEGMENTS; return its bytes.

    hole: never written; zeros: written zeros (allocated); data: random;
    speckled: zeros with a few random bytes (zero blocks beside data blocks).
    """
    content = bytearray()
    with open(path, "wb") as f:
        for kind, length, seed in segments:
            rng = np.random.default_rng(seed)
            if kind == "hole":
                chunk = bytes(length)
            elif kind == "zeros":
                chunk = bytes(length)
                f.seek(len(content))
                f.write(chunk)
            elif kind == "data":
                chunk = rng.integers(1, 256, length, dtype=np.uint8).tobytes()
                f.seek(len(content))
                f.write(chunk)
            else:
                buf = bytearray(length)
                for pos in rng.integers(0, length, 1 + length // 20000):
                    buf[int(pos)] = int(rng.integers(1, 256))
                chunk = bytes(buf)
                f.seek(len(content))
                f.write(chunk)
            content += chunk
        f.truncate(len(content))
    return bytes(content)


@st.composite
def extents_within(draw: st.DrawFn, size: int) -> list[tuple[int, int]]:
    """Sorted, non-overlapping (sometimes touching) extents; some reach past SIZE."""
    limit = size + 64 * KiB
    cuts = sorted(draw(st.lists(st.integers(0, limit), min_size=2, max_size=12)))
    out = []
    for a, b in zip(cuts[::2], cuts[1::2], strict=False):
        if b > a:
            out.append((a, b - a))
    return out


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


def open_pair(src: Path, dst: Path) -> tuple[int, int]:
    return os.open(src, os.O_RDONLY), os.open(dst, os.O_RDWR)


# -- the C kernels ---------------------------------------------------------------


@given(
    st.integers(0, 300),
    st.lists(st.integers(0, 299), max_size=3),
)
def test_buffer_is_zero_matches_python(length: int, nonzero_at: list[int]) -> None:
    buf = bytearray(length)
    for pos in nonzero_at:
        if pos < length:
            buf[pos] = 0x80
    assert _copy.buffer_is_zero(buf) == (not any(buf))


def test_buffer_is_zero_every_position() -> None:
    for length in (1, 15, 16, 17, 31, 32, 33, 4096):
        assert _copy.buffer_is_zero(bytes(length))
        for pos in range(length):
            buf = bytearray(length)
            buf[pos] = 1
            assert not _copy.buffer_is_zero(buf), (length, pos)


@given(st.lists(SEGMENT, min_size=1, max_size=8))
def test_data_extents_match_seek_walk(tmp_path_factory: pytest.TempPathFactory, segments) -> None:
    path = tmp_path_factory.mktemp("extents") / "src"
    content = write_layout(path, segments)
    fd = os.open(path, os.O_RDONLY)
    try:
        got = [(int(o), int(n)) for o, n in _copy.data_extents(fd, len(content), chunk=2)]
        assert got == py_data_extents(fd, len(content))
    finally:
        os.close(fd)


@given(
    segments=st.lists(SEGMENT, min_size=1, max_size=8),
    data=st.data(),
    block=st.sampled_from([4 * KiB, 16 * KiB, 64 * KiB]),
    buffer_blocks=st.integers(1, 4),
    fresh=st.booleans(),
    cfr=st.booleans(),
    old_kind=st.sampled_from(["empty", "random", "short"]),
)
def test_single_call_matches_reference(
    tmp_path_factory: pytest.TempPathFactory,
    segments,
    data: st.DataObject,
    block: int,
    buffer_blocks: int,
    fresh: bool,
    cfr: bool,
    old_kind: str,
) -> None:
    """One bm_copy_extents call: bytes equal the reference copy; the stats
    add up; zero detection writes exactly the reference's nonzero pieces; dst
    allocation is no more than those pieces (plus old data outside the copy)."""
    d = tmp_path_factory.mktemp("copy")
    src_path, dst_path = d / "src", d / "dst"
    src = write_layout(src_path, segments)
    extents = data.draw(extents_within(len(src)))
    if fresh:
        old_kind = "empty"
    if old_kind == "empty":
        old = bytes(len(src))
        with open(dst_path, "wb") as f:
            f.truncate(len(src))
    else:
        size = len(src) if old_kind == "random" else len(src) // 2
        old = np.random.default_rng(len(src)).integers(1, 256, size, dtype=np.uint8).tobytes()
        dst_path.write_bytes(old)
    old_blocks = allocated_blocks(dst_path)

    src_fd, dst_fd = open_pair(src_path, dst_path)
    try:
        copier = _copy.new_copier(src_fd, dst_fd, block, copy_file_range=cfr)
        buf = _copy.new_buffer(block * buffer_blocks)
        arr = as_extent_array(extents)
        counts = _copy.copy_extents(copier, arr, buf, _copy.DST_FRESH if fresh else 0)
        stats, found = vars(counts), counts.found_unsupported
        seg = py_data_extents(src_fd, len(src))
    finally:
        os.close(src_fd)
        os.close(dst_fd)

    expected = reference_copy(src, old, extents)
    got = dst_path.read_bytes()
    assert len(got) <= len(expected)
    assert got.ljust(len(expected), b"\0") == expected

    total = sum(n for _, n in extents)
    assert stats["bytes_read"] + stats["bytes_hole"] == total
    assert stats["bytes_written"] + stats["bytes_zero"] == stats["bytes_read"]
    in_data = sum(e - s for o, n in extents for s, e in intersect(seg, o, o + n))
    assert stats["bytes_read"] == in_data  # holes and past-the-end are never read
    if fresh:
        assert stats["bytes_punched"] == 0
    assert found == 0  # ext4 does all three

    if cfr:
        written = [se for o, n in extents for se in intersect(seg, o, min(o + n, len(src)))]
        assert stats["bytes_zero"] == 0
    else:
        written = reference_written_pieces(src, seg, extents, block)
        assert stats["bytes_written"] == sum(e - s for s, e in written)

    copied = [(o, o + n) for o, n in extents]
    allowed = blocks_touching(written) | (old_blocks - blocks_inside(copied))
    assert allocated_blocks(dst_path) <= allowed


# -- the Copier ----------------------------------------------------------------


def _random_image(path: Path, size: int, seed: int, pieces: int = 24) -> bytes:
    """SIZE bytes: random data, written zeros and holes in random pieces."""
    rng = np.random.default_rng(seed)
    segments = []
    left = size
    while left > 0:
        length = min(left, int(rng.integers(1, 2 * size // pieces + 2)))
        kind = ["hole", "zeros", "data", "speckled"][int(rng.integers(0, 4))]
        segments.append((kind, length, int(rng.integers(0, 2**32))))
        left -= length
    return write_layout(path, segments)


@given(
    seed=st.integers(0, 2**32 - 1),
    data=st.data(),
    workers=st.integers(1, 4),
    batch=st.sampled_from([4 * KiB, 40 * KiB, 1 * MiB]),
    fresh=st.booleans(),
    cfr=st.sampled_from([None, True, False]),
)
def test_copier_matches_reference(
    tmp_path_factory: pytest.TempPathFactory,
    seed: int,
    data: st.DataObject,
    workers: int,
    batch: int,
    fresh: bool,
    cfr: bool | None,
) -> None:
    """Split into items on a thread pool, the result is still the reference
    copy, the stats add up, progress adds up, and zero cells stay holes."""
    d = tmp_path_factory.mktemp("copier")
    src_path, dst_path = d / "src", d / "dst"
    src = _random_image(src_path, 600 * KiB, seed)
    extents = data.draw(extents_within(len(src)))
    if fresh:
        old = bytes(len(src))
        with open(dst_path, "wb") as f:
            f.truncate(len(src))
    else:
        old = np.random.default_rng(seed).integers(1, 256, len(src), dtype=np.uint8).tobytes()
        dst_path.write_bytes(old)
    old_blocks = allocated_blocks(dst_path)
    src_fd, dst_fd = open_pair(src_path, dst_path)
    seen: list[int] = []
    threads: set[int] = set()

    def progress(n: int) -> None:
        seen.append(n)
        threads.add(threading.get_ident())

    try:
        with Copier(
            src_fd,
            dst_fd,
            workers=workers,
            batch_bytes=batch,
            block_size=4 * KiB,
            buffer_bytes=8 * KiB,
            use_copy_file_range=cfr,
        ) as copier:
            stats = copier.copy_extents(extents, dst_fresh=fresh, progress=progress)
            used_cfr = copier.uses_copy_file_range
            assert used_cfr == (copier.prefers_copy_file_range() if cfr is None else cfr)
    finally:
        os.close(src_fd)
        os.close(dst_fd)

    expected = reference_copy(src, old, extents)
    got = dst_path.read_bytes()
    assert got.ljust(len(expected), b"\0") == expected
    total = sum(n for _, n in extents)
    assert stats.copied == total == sum(seen)
    assert threads <= {threading.get_ident()}
    assert stats.bytes_written + stats.bytes_zero == stats.bytes_read
    if not used_cfr:
        # Cells (4 KiB, the block size) with a nonzero source byte in the copied
        # ranges are the only ones that may be allocated now.
        nonzero = [
            (c * 4 * KiB, (c + 1) * 4 * KiB)
            for o, n in extents
            for c in range(o // (4 * KiB), (o + n - 1) // (4 * KiB) + 1)
            if any(src[max(o, c * 4 * KiB) : min(o + n, (c + 1) * 4 * KiB)])
        ]
        copied = [(o, o + n) for o, n in extents]
        allowed = blocks_touching(nonzero) | (old_blocks - blocks_inside(copied))
        assert allocated_blocks(dst_path) <= allowed


@pytest.mark.parametrize("align", [1, 512, 4096])
@pytest.mark.parametrize("size", [1, 7, 1000, 4096, 10**9])
def test_split_extents_cuts_the_stream_evenly(size: int, align: int) -> None:
    rng = np.random.default_rng(size + align)
    offsets = np.cumsum(rng.integers(3000, 8000, 200)).tolist()
    # Extents of up to 3000 bytes (some empty) and one long one, cut many
    # times. Cut into items of a few bytes with ALIGN 1, that made ~400,000
    # items and taught no more than a stream scaled to SIZE does: extents up
    # to three items long (shorter ones, whole ones, ones cut twice, in every
    # mix) and a long one of 100 items. (With ALIGN > 1 the cuts snap to its
    # multiples, which bounds the items whatever SIZE is.)
    scaled = align == 1 and size < 1000
    longest, long = (3 * size, 100 * size) if scaled else (3000, 100_000)
    pairs = list(zip(offsets, rng.integers(0, longest, 200).tolist(), strict=True))
    pairs += [(offsets[-1] + 10_000, long)]
    arr = as_extent_array(pairs)
    items = split_extents(arr, size, align)
    sums = [int(it["length"].sum()) for it in items]
    assert all(0 < n <= size + align - 1 for n in sums)
    if align == 1:
        assert all(n == size for n in sums[:-1])
    assert all(it.flags.c_contiguous and it.dtype == EXTENT_DTYPE for it in items)
    flat = [(int(o), int(n)) for it in items for o, n in it]
    nonempty = [(o, n) for o, n in pairs if n]
    # The pieces, in order, tile the non-empty input extents exactly, and a
    # cut inside an extent falls on a multiple of ALIGN.
    j, pos = 0, nonempty[0][0]
    for o, n in flat:
        if pos == nonempty[j][0] + nonempty[j][1]:
            j, pos = j + 1, nonempty[j + 1][0]
        assert o == pos and n > 0
        assert o == nonempty[j][0] or o % align == 0
        pos += n
    assert (j, pos) == (len(nonempty) - 1, sum(nonempty[-1]))


def test_merge_touching_merges_only_touching_runs() -> None:
    arr = as_extent_array([(0, 10), (10, 5), (15, 0), (15, 1), (20, 4), (30, 2), (32, 2), (5, 1)])
    got = [(int(o), int(n)) for o, n in merge_touching(arr)]
    assert got == [(0, 16), (20, 4), (30, 4), (5, 1)]
    assert len(merge_touching(as_extent_array([]))) == 0


def test_copy_stats_add_up() -> None:
    a = CopyStats(1, 2, 3, 4, 5, 0.5)
    b = CopyStats(10, 20, 30, 40, 50, 1.5)
    total = a + b
    assert total == CopyStats(11, 22, 33, 44, 55, 2.0)
    assert total.copied == 11 + 44
    assert total.throughput == pytest.approx(55 / 2.0)
    assert sum([a, b], CopyStats()) == total
    assert CopyStats().throughput == 0.0


# -- behaviour on purpose ----------------------------------------------------------


@pytest.fixture
def image_pair(tmp_path: Path) -> Iterator[tuple[Path, Path, bytes]]:
    """A 6 MiB source: random data, written zeros, holes; dst missing."""
    src = tmp_path / "src.img"
    content = write_layout(
        src,
        [
            ("data", 1 * MiB, 1),
            ("zeros", 1 * MiB, 0),
            ("hole", 1 * MiB, 0),
            ("speckled", 1 * MiB, 2),
            ("hole", 1 * MiB, 0),
            ("data", 1 * MiB, 3),
        ],
    )
    yield src, tmp_path / "dst.img", content


def test_bulk_copy_into_fresh_file_stays_sparse(image_pair) -> None:
    src, dst, content = image_pair
    with open(dst, "wb") as f:
        f.truncate(len(content))
    src_fd, dst_fd = open_pair(src, dst)
    try:
        with Copier(src_fd, dst_fd, use_copy_file_range=False) as copier:
            extents = copier.allocated_extents()
            assert [(int(o), int(n)) for o, n in extents] == py_data_extents(src_fd, len(content))
            stats = copier.copy_extents(extents, dst_fresh=True)
    finally:
        os.close(src_fd)
        os.close(dst_fd)
    assert dst.read_bytes() == content
    assert stats.bytes_hole == 0  # only allocated extents were asked for
    assert stats.bytes_read == 4 * MiB
    assert stats.bytes_zero >= 1 * MiB  # the written zeros at least
    assert stats.bytes_written == nonzero_cells(content, 65536)
    assert stats.bytes_punched == 0
    assert os.stat(dst).st_blocks * 512 <= stats.bytes_written + 64 * KiB


def test_dirty_pass_punches_zeros_and_holes_over_old_data(image_pair) -> None:
    src, dst, content = image_pair
    dst.write_bytes(os.urandom(len(content)))  # old data everywhere, all allocated
    src_fd, dst_fd = open_pair(src, dst)
    try:
        with Copier(src_fd, dst_fd, use_copy_file_range=False) as copier:
            stats = copier.copy_extents([(0, len(content))], dst_fresh=False)
    finally:
        os.close(src_fd)
        os.close(dst_fd)
    assert dst.read_bytes() == content
    assert stats.bytes_hole == 2 * MiB
    assert stats.bytes_punched == len(content) - stats.bytes_written
    assert os.stat(dst).st_blocks * 512 <= stats.bytes_written + 64 * KiB


def test_copy_file_range_on_and_off_agree(image_pair, tmp_path: Path) -> None:
    src, _, content = image_pair
    results = {}
    for cfr in (True, False):
        dst = tmp_path / f"dst-{cfr}"
        dst.write_bytes(os.urandom(len(content)))
        src_fd, dst_fd = open_pair(src, dst)
        try:
            with Copier(src_fd, dst_fd, use_copy_file_range=cfr, batch_bytes=MiB) as copier:
                results[cfr] = copier.copy_extents([(0, len(content))])
                assert copier.uses_copy_file_range is cfr
        finally:
            os.close(src_fd)
            os.close(dst_fd)
        assert dst.read_bytes() == content
    # Same outcome, different road: the kernel copy moves written zeros as data.
    assert results[True].bytes_zero == 0
    assert results[False].bytes_zero >= MiB
    assert results[True].bytes_hole == results[False].bytes_hole == 2 * MiB


def test_auto_copy_file_range_follows_source_holes(image_pair, tmp_path: Path) -> None:
    src, dst, _ = image_pair
    dst.write_bytes(b"")
    full = tmp_path / "full.img"
    full.write_bytes(os.urandom(MiB))
    for path, expected in ((src, True), (full, False)):
        src_fd, dst_fd = open_pair(path, dst)
        try:
            with Copier(src_fd, dst_fd) as copier:
                assert copier.source_reports_holes() is expected
                fs = subprocess.run(["stat", "-f", "-c", "%T", str(dst)], check=True,
                                    capture_output=True, text=True).stdout.strip()
                # ext2/3/4 (stat's "ext2/ext3"): read/write beats the kernel's splice.
                assert copier.uses_copy_file_range is (expected and fs != "ext2/ext3")
        finally:
            os.close(src_fd)
            os.close(dst_fd)


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm (tmpfs)")
def test_copy_file_range_across_filesystems_falls_back(image_pair) -> None:
    src, _, content = image_pair
    dst = Path("/dev/shm") / f"blockmirror-test-{os.getpid()}"
    try:
        dst.write_bytes(b"")
        src_fd, dst_fd = open_pair(src, dst)
        try:
            with Copier(src_fd, dst_fd, use_copy_file_range=True, batch_bytes=MiB) as copier:
                if os.stat(src).st_dev == os.stat(dst).st_dev:
                    pytest.skip("/dev/shm is on the same filesystem")
                stats = copier.copy_extents([(0, len(content))], dst_fresh=True)
                assert not copier.uses_copy_file_range  # EXDEV remembered
                assert stats.bytes_zero > 0  # the rest went through read + zero detection
        finally:
            os.close(src_fd)
            os.close(dst_fd)
        assert dst.read_bytes().ljust(len(content), b"\0") == content
    finally:
        dst.unlink(missing_ok=True)


def test_copy_past_destination_end_extends_it(image_pair) -> None:
    src, dst, content = image_pair
    dst.write_bytes(b"")
    src_fd, dst_fd = open_pair(src, dst)
    try:
        with Copier(src_fd, dst_fd, use_copy_file_range=False) as copier:
            copier.copy_extents([(0, len(content))], dst_fresh=True)
    finally:
        os.close(src_fd)
        os.close(dst_fd)
    got = dst.read_bytes()
    assert len(got) == len(content)  # the last segment is data: pwrite extends
    assert got == content


def test_range_past_source_end_reads_as_zeros(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(b"\x01" * 10000)
    dst.write_bytes(b"\x02" * 50000)
    src_fd, dst_fd = open_pair(src, dst)
    try:
        with Copier(src_fd, dst_fd, use_copy_file_range=False) as copier:
            stats = copier.copy_extents([(8192, 30000)])
    finally:
        os.close(src_fd)
        os.close(dst_fd)
    got = dst.read_bytes()
    assert got[:8192] == b"\x02" * 8192
    assert got[8192:10000] == b"\x01" * (10000 - 8192)
    assert got[10000:38192] == bytes(28192)
    assert got[38192:] == b"\x02" * (50000 - 38192)
    assert stats.bytes_hole == 28192 and stats.bytes_read == 10000 - 8192


# -- errors --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad_side", "cfr"),
    [("dst", False), ("dst", True), ("src", False)],
    ids=["read-only-dst", "read-only-dst-copy_file_range", "write-only-src"],
)
def test_bad_descriptor_raises_ebadf_naming_its_file(image_pair, bad_side, cfr) -> None:
    src, dst, content = image_pair
    dst.write_bytes(b"")
    src_flags, dst_flags = (os.O_WRONLY, os.O_RDWR) if bad_side == "src" else (os.O_RDONLY,) * 2
    src_fd = os.open(src, src_flags)
    dst_fd = os.open(dst, dst_flags)
    try:
        with (
            Copier(
                src_fd, dst_fd, use_copy_file_range=cfr, src_path=str(src), dst_path=str(dst)
            ) as copier,
            pytest.raises(OSError) as info,
        ):
            copier.copy_extents([(0, len(content))], dst_fresh=True)
        assert info.value.errno == errno.EBADF
        assert info.value.filename == str(src if bad_side == "src" else dst)
    finally:
        os.close(src_fd)
        os.close(dst_fd)


def test_cancel_flag_stops_a_call(image_pair) -> None:
    src, dst, content = image_pair
    dst.write_bytes(b"")
    src_fd, dst_fd = open_pair(src, dst)
    cancel = _copy.new_cancel_flag()
    cancel[0] = 1
    try:
        with pytest.raises(OSError) as info:
            extents = as_extent_array([(0, len(content))])
            copier = _copy.new_copier(src_fd, dst_fd, 65536)
            _copy.copy_extents(copier, extents, None, cancel=cancel)
        assert info.value.errno == errno.ECANCELED
    finally:
        os.close(src_fd)
        os.close(dst_fd)
    assert os.stat(dst).st_size == 0


def test_out_of_space_raises_enospc_and_stops_every_worker(tmp_path: Path, small_tmpfs) -> None:
    src = tmp_path / "big"
    src.write_bytes(np.random.default_rng(1).integers(1, 256, 16 * MiB, np.uint8).tobytes())
    dst = small_tmpfs("2m") / "dst"
    dst.write_bytes(b"")
    src_fd, dst_fd = open_pair(src, dst)
    try:
        with Copier(
            src_fd, dst_fd, workers=4, batch_bytes=MiB, use_copy_file_range=False, dst_path=str(dst)
        ) as copier:
            with pytest.raises(OSError) as info:
                copier.copy_extents([(0, 16 * MiB)], dst_fresh=True)
            assert info.value.errno == errno.ENOSPC
            assert info.value.filename == str(dst)
            # Nothing writes once the call has raised.
            size = os.fstat(dst_fd).st_size
            time.sleep(0.2)
            assert os.fstat(dst_fd).st_size == size
            # The copier stays usable after a failed call.
            os.ftruncate(dst_fd, 0)
            stats = copier.copy_extents([(0, 4096)])
            assert stats.bytes_written == 4096
    finally:
        os.close(src_fd)
        os.close(dst_fd)


# -- the rest of the API ---------------------------------------------------------


def test_rate_limit_caps_data_but_not_holes(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    with open(src, "wb") as f:
        f.write(os.urandom(4 * MiB))
        f.truncate(260 * MiB)  # 256 MiB hole after the data
    dst.write_bytes(b"")
    src_fd, dst_fd = open_pair(src, dst)
    try:
        with Copier(src_fd, dst_fd, rate_limit=8 * MiB, use_copy_file_range=False) as copier:
            start = time.perf_counter()
            stats = copier.copy_extents([(0, 260 * MiB)], dst_fresh=True)
            elapsed = time.perf_counter() - start
    finally:
        os.close(src_fd)
        os.close(dst_fd)
    assert stats.bytes_read == 4 * MiB and stats.bytes_hole == 256 * MiB
    # 4 MiB at 8 MiB/s: the last 1 MiB buffer starts no earlier than 0.375 s.
    assert elapsed >= 0.3
    assert elapsed < 0.5 * (260 / 8)  # the hole was not charged


def test_pace_spaces_items_outside_their_hooks(tmp_path: Path) -> None:
    """A paced copy waits between work items, never between an item's
    BEFORE_ITEM and AFTER_ITEM (the mirror's interlock is held in there)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(os.urandom(8 * MiB))
    dst.write_bytes(b"")
    held: list[float] = []
    began: list[float] = []

    def before(item) -> None:
        began.append(time.perf_counter())

    def after(item) -> None:
        held.append(time.perf_counter() - began[-1])

    src_fd, dst_fd = open_pair(src, dst)
    try:
        with Copier(src_fd, dst_fd, workers=1, batch_bytes=1 * MiB,
                    use_copy_file_range=False) as copier:
            copier.pace(16 * MiB)
            start = time.perf_counter()
            copier.copy_extents([(0, 8 * MiB)], dst_fresh=True, before_item=before,
                                after_item=after)
            elapsed = time.perf_counter() - start
            copier.pace(None)
            assert copier.pace_rate == 0
    finally:
        os.close(src_fd)
        os.close(dst_fd)
    assert dst.read_bytes() == src.read_bytes()
    assert len(began) == 8
    # 8 items of 1 MiB at 16 MiB/s: the last starts no earlier than 7/16 s...
    assert elapsed >= 0.4
    # ...and the waiting was not done holding the hooks.
    assert sum(held) < elapsed / 2, (held, elapsed)



class _Clock:
    """perf_counter and sleep for the copier's pace, on a clock the test moves."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept = 0.0

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept += seconds
        self.now += seconds


def _paced_waits(monkeypatch, tmp_path: Path, stall: float, items: int) -> float:
    """Seconds a copier paced at 10 MiB/s waits before ITEMS items of 1 MiB
    that follow one item which took STALL seconds."""
    import blockmirror.copying.copier as copier_module

    clock = _Clock()
    monkeypatch.setattr(copier_module, "time", clock)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(b"")
    dst.write_bytes(b"")
    item = as_extent_array([(0, 1 * MiB)])
    src_fd, dst_fd = open_pair(src, dst)
    try:
        with Copier(src_fd, dst_fd, workers=1) as copier:
            copier.pace(10 * MiB)
            copier._wait_for_pace(item)
            clock.now += stall  # the item the kernel held
            clock.slept = 0.0
            for _ in range(items):
                copier._wait_for_pace(item)
                clock.now += 0.001  # each of these copies at once
    finally:
        os.close(src_fd)
        os.close(dst_fd)
    return clock.slept


def test_pace_makes_up_for_an_item_slower_than_its_time(monkeypatch, tmp_path: Path) -> None:
    """An item held 0.4 s instead of its 0.1 s leaves credit: the next three
    go at once, so the copy still averages its pace (without the credit
    each would wait its 0.1 s and the copy would fall behind for good)."""
    assert _paced_waits(monkeypatch, tmp_path, stall=0.4, items=3) < 0.01


def test_pace_credit_is_bounded(monkeypatch, tmp_path: Path) -> None:
    """After a 3 s stall at most PACE_CATCH_UP s are made up: a long stall
    does not turn into a burst that would crowd writers out."""
    from blockmirror.copying.copier import PACE_CATCH_UP

    n = 10
    waited = _paced_waits(monkeypatch, tmp_path, stall=3.0, items=n)
    # The last item starts (n - 1) x 0.1 s after the first, which may start
    # PACE_CATCH_UP s early; the items' own 1 ms each is time not waited.
    assert waited == pytest.approx((n - 1) * 0.1 - PACE_CATCH_UP - (n - 1) * 0.001, abs=0.005)


def test_bad_arguments_are_refused(image_pair) -> None:
    src, dst, _ = image_pair
    dst.write_bytes(b"")
    src_fd, dst_fd = open_pair(src, dst)
    try:
        for kwargs in (
            {"workers": 0},
            {"block_size": 3000},
            {"block_size": 256},
            {"block_size": 65536, "buffer_bytes": 4096},
            {"batch_bytes": 0},
            {"rate_limit": -1.0},
        ):
            with pytest.raises(ValueError):
                Copier(src_fd, dst_fd, **kwargs)
        copier = Copier(src_fd, dst_fd)
        for bad in ([(-1, 10)], [(0, -5)], [(2**63 - 10, 20)]):
            with pytest.raises(ValueError):
                copier.copy_extents(bad)
        copier.close()
        copier.close()
        with pytest.raises(ValueError):
            copier.copy_extents([(0, 1)])
    finally:
        os.close(src_fd)
        os.close(dst_fd)


def test_empty_and_structured_inputs(image_pair) -> None:
    src, dst, content = image_pair
    dst.write_bytes(b"")
    src_fd, dst_fd = open_pair(src, dst)
    try:
        with Copier(src_fd, dst_fd) as copier:
            assert copier.copy_extents([]).copied == 0
            assert copier.copy_extents(np.empty(0, dtype=EXTENT_DTYPE)).copied == 0
            other = np.array([(0, MiB)], dtype=[("offset", np.int64), ("length", np.int64)])
            assert copier.copy_extents(other).copied == MiB
    finally:
        os.close(src_fd)
        os.close(dst_fd)
    assert dst.read_bytes() == content[:MiB]


def test_touching_extents_merge_into_one_punch(tmp_path: Path) -> None:
    """Zeros across an unaligned extent boundary are punched as one run: were
    [0, 5000) and [5000, 20480) punched apart, the block holding offset 5000
    would be zeroed in place but stay allocated."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(bytes(5 * FS_BLOCK))  # written zeros: data to SEEK_DATA
    dst.write_bytes(os.urandom(5 * FS_BLOCK))
    src_fd, dst_fd = open_pair(src, dst)
    try:
        extents = as_extent_array([(0, 5000), (5000, 5 * FS_BLOCK - 5000)])
        counts = _copy.copy_extents(_copy.new_copier(src_fd, dst_fd, 4096), extents, None)
        stats = vars(counts)
    finally:
        os.close(src_fd)
        os.close(dst_fd)
    assert stats["bytes_zero"] == stats["bytes_punched"] == 5 * FS_BLOCK
    assert dst.read_bytes() == bytes(5 * FS_BLOCK)
    assert allocated_blocks(dst) == set()
