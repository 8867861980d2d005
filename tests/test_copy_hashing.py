"""Issue 11: hash while copying.

The copier can hand back the xxh3-64 digest of every granule it copied
whole, computed in C from the buffer the data was just read into. The slow
twin is reading the destination back and hashing it in Python: the two must
agree on every granule the copier reports, and the copier must report
nothing it did not see whole.
"""

from __future__ import annotations

import importlib
import os
import random
from pathlib import Path

import numpy as np
import pytest
import xxhash

from blockmirror._bindings import copy as _c
from blockmirror.copying.copier import Copier, DigestRequest, digest_granules
from blockmirror.extents import as_extent_array
from blockmirror.migration import sync
from blockmirror.migration.manifest import Manifest, manifest_path

KiB, MiB = 1 << 10, 1 << 20

needs_c_digest = pytest.mark.skipif(_c.digest_function() is None,
                                    reason="xxhash's library does not export XXH3_64bits")


def _digest(data: bytes) -> int:
    return xxhash.xxh3_64_intdigest(data) or 1


def _sparse_source(path: Path, size: int, seed: int) -> None:
    """Data at unaligned offsets, zero blocks inside data, holes between."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for _ in range(12):
            off = rng.randrange(0, size - 200 * KiB) // 4096 * 4096
            block = bytearray(rng.randbytes(rng.randrange(4, 200) * KiB))
            block[len(block) // 3: len(block) // 3 + 64 * KiB] = bytes(64 * KiB)
            f.seek(off)
            f.write(block)


@needs_c_digest
@pytest.mark.parametrize("granularity", [4 * KiB, 64 * KiB, 1 * MiB])
@pytest.mark.parametrize("fresh", [True, False])
def test_reported_digests_are_the_copys_granules(tmp_path, granularity, fresh):
    src, dst = tmp_path / "src", tmp_path / "dst"
    size = 8 * MiB + 3 * KiB
    _sparse_source(src, size, seed=granularity + fresh)
    dst.write_bytes(os.urandom(size) if not fresh else b"")
    os.truncate(dst, size)
    rng = random.Random(granularity)
    cuts = sorted(rng.sample(range(1, size // 4096), 9))
    pieces = [(a * 4096, (b - a) * 4096) for a, b in zip([0, *cuts], cuts, strict=False)]
    pieces.append((cuts[-1] * 4096, size - cuts[-1] * 4096))
    extents = pieces[::2]  # with gaps: touching extents would be merged into one
    request = DigestRequest(granularity)
    sfd, dfd = os.open(src, os.O_RDONLY), os.open(dst, os.O_RDWR)
    try:
        with Copier(sfd, dfd, workers=3, batch_bytes=MiB) as copier:
            copier.copy_extents(extents, dst_fresh=fresh, digests=request)
    finally:
        os.close(sfd)
        os.close(dfd)
    copy, original = dst.read_bytes(), src.read_bytes()
    for off, n in extents:
        assert copy[off:off + n] == original[off:off + n]
    keys, values = request.take()
    assert len(np.unique(keys)) == len(keys) > 0
    for k, v in zip(keys.tolist(), values.tolist(), strict=True):
        start = k * granularity
        assert start + granularity <= size, "a granule cut by the end was reported"
        assert v == _digest(copy[start:start + granularity]), f"granule {k}"
    # Whole granules inside one extent are all reported (none re-read later).
    whole = {k for off, n in extents
             for k in range(-(-off // granularity), (off + n) // granularity)}
    assert set(keys.tolist()) == whole


@needs_c_digest
def test_a_sink_too_small_is_refused(tmp_path):
    src = tmp_path / "src"
    src.write_bytes(os.urandom(256 * KiB))
    sfd = os.open(src, os.O_RDONLY)
    dfd = os.open(tmp_path / "dst", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        copier = _c.new_copier(sfd, dfd, 65536)
        fn = _c.digest_function()
        assert fn is not None
        ext = as_extent_array([(0, 256 * KiB)])
        out = np.zeros(len(_c.digest_slots(ext, 65536)) - 1, dtype=np.uint64)
        with pytest.raises(OSError, match="slots"):
            _c.copy_extents(copier, ext, None, 0, digests=(fn, 65536, 1, out))
    finally:
        os.close(sfd)
        os.close(dfd)


@pytest.mark.parametrize("in_c", [True, False])
def test_a_synced_manifest_equals_one_made_by_reading_the_copy(tmp_path, monkeypatch, in_c):
    """End to end: the manifest sync writes (digests from the copy's
    buffers, or - where C cannot call the digest - read back at the
    commit) is the one hashing the finished copy gives."""
    if in_c and _c.digest_function() is None:
        pytest.skip("xxhash's library does not export XXH3_64bits")
    if not in_c:
        monkeypatch.setattr(_c, "digest_function", lambda: None)
    src = tmp_path / "a.img"
    _sparse_source(src, 64 * MiB + 5, seed=3)
    dst = tmp_path / "out" / "a.img"
    dst.parent.mkdir()
    sync(src, dst)
    assert dst.read_bytes() == src.read_bytes()
    made = Manifest.open(manifest_path(str(dst)))
    again = Manifest.create(str(tmp_path / "again"), granularity=made.granularity,
                            image_size=made.image_size, source="")
    fd = os.open(dst, os.O_RDONLY)
    try:
        again.record(fd, [(0, made.image_size)])
    finally:
        os.close(fd)
    try:
        assert made.table.keys.tolist() == again.table.keys.tolist()
        assert made.table.values.tolist() == again.table.values.tolist()
        assert not len(made.table.unknown)
    finally:
        made.close()
        again.discard()


@needs_c_digest
def test_digest_granules_in_c_matches_python(tmp_path):
    """The C read-and-hash of a file's granules: whole ones, the short last
    one, and bytes past the file's end (zeros) hashed as Python does."""
    path = tmp_path / "f"
    data = os.urandom(5 * 65536 + 1234)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset, length in ((0, len(data)), (65536, 2 * 65536), (4 * 65536, 3 * 65536)):
            found = digest_granules(fd, offset, length, 65536)
            assert found is not None
            want = (data[offset:offset + length]).ljust(length, b"\0")
            expect = [_digest(want[i:i + 65536]) for i in range(0, length, 65536)]
            assert found.tolist() == expect
        with pytest.raises(OSError, match="granule"):
            digest_granules(fd, 4096, 65536, 65536)
    finally:
        os.close(fd)


@needs_c_digest
def test_data_found_mid_granule_is_read_to_its_granules_end_only(tmp_path):
    """One extent over the whole file; data starts inside a granule whose
    start is a hole, and far more hole follows before the next data. The
    copy reads from that granule's start (to hash it whole) but asks where
    the data ends from the data itself: it must not read the whole rest."""
    g = 64 * KiB
    src, dst = tmp_path / "src", tmp_path / "dst"
    size = 64 * MiB
    first, second = os.urandom(8 * KiB), os.urandom(g)
    with open(src, "wb") as f:
        f.truncate(size)
        f.seek(3 * g + 20 * KiB)  # mid-granule, a hole before it in the granule
        f.write(first)
        f.seek(size - 2 * g)
        f.write(second)
    sfd = os.open(src, os.O_RDONLY)
    if os.lseek(sfd, 0, os.SEEK_DATA) == 0:  # the filesystem shows no holes
        os.close(sfd)
        pytest.skip("the filesystem under tmp_path does not report holes")
    dfd = os.open(dst, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        request = DigestRequest(g)
        with Copier(sfd, dfd, workers=1, use_copy_file_range=False) as c:
            stats = c.copy_extents([(0, size)], dst_fresh=True, digests=request)
        os.ftruncate(dfd, size)
        keys, values = request.take()
    finally:
        os.close(sfd)
        os.close(dfd)
    # Granule 3 (hole, then the data) and the granule of the second write;
    # a filesystem may round data out to its own block, never to the rest.
    assert stats.bytes_read <= 4 * g, stats
    assert dst.read_bytes() == src.read_bytes()
    content = src.read_bytes()
    for k, v in zip(keys.tolist(), values.tolist(), strict=True):
        assert v == _digest(content[k * g:(k + 1) * g])
    assert {3, size // g - 2} <= set(keys.tolist())


def test_the_filesystem_type_comes_from_c(tmp_path) -> None:
    """What decides copy_file_range onto ext4 (Copier.prefers_copy_file_range)
    is statfs's f_type, read in C without ctypes."""
    proc = os.open("/proc/self", os.O_RDONLY)
    try:
        assert _c.filesystem_type(proc) == 0x9FA0  # PROC_SUPER_MAGIC
    finally:
        os.close(proc)
    assert _c.filesystem_type(proc) is None  # closed: EBADF


def test_a_missing_symbol_is_null() -> None:
    from blockmirror._bindings._ffi import ffi, lib

    path = importlib.import_module("xxhash._xxhash").__file__
    assert lib.bm_library_symbol(os.fsencode(path), b"no_such_symbol_here") == ffi.NULL
    assert lib.bm_library_symbol(b"/nonexistent/lib.so", b"XXH3_64bits") == ffi.NULL
