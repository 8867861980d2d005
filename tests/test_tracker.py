"""Basic API tests for Tracker and TrackedImage: round trips, context
managers, the writer's file operations and the shape of the errors."""

from __future__ import annotations

import errno
import os
import stat

import pytest
from imagetools import read_at

import blockmirror
from blockmirror import BlockMirrorError, TrackedImage, Tracker, sidecar_path
from blockmirror._bindings import writer as _writer
from blockmirror.tracking.tracker import DEFAULT_GRANULARITY, MAX_IMAGE_SIZE

KiB = 1024
MiB = 1024 * KiB
G = 65536  # default granularity


# -- Tracker ------------------------------------------------------------------


def test_create_defaults(tmp_image):
    with Tracker.create(tmp_image) as t:
        assert t.granularity == G == DEFAULT_GRANULARITY
        assert t.generation == 0
        assert t.image_size == 4 * MiB
        assert t.consistent is True
        assert t.dirty_bytes() == 0
        assert t.dirty_extents() == []
        assert t.fetch_and_clear() == []
        assert t.path == sidecar_path(tmp_image) == os.fspath(tmp_image) + ".cbt"
        assert len(t.series) == 32
        info = t.info()
        assert info.state == "running"
        assert info.live_writers == 0
        assert t.consistent is True
        assert t.dirty_bytes() == 0
    assert os.path.exists(sidecar_path(tmp_image))


@pytest.mark.parametrize("granularity", [4096, 8192, 1 << 20, 64 << 20])
def test_create_granularity(tmp_image, granularity):
    with Tracker.create(tmp_image, granularity=granularity) as t:
        assert t.granularity == granularity
    with Tracker.open(tmp_image) as t:
        assert t.granularity == granularity


def test_mark_round_trip(tracked_image):
    with Tracker.open(tracked_image) as t:
        t.mark(0, 1)
        t.mark(3 * G + 5, 2 * G)  # partial granules round outward: 3, 4, 5
        t.mark(10 * G, G)  # exactly one granule
        expected = [(0, G), (3 * G, 3 * G), (10 * G, G)]
        assert t.dirty_extents() == expected
        assert t.dirty_extents() == expected  # a snapshot does not clear
        assert t.dirty_bytes() == 5 * G
        assert t.generation == 0
        assert t.fetch_and_clear() == expected
        assert t.generation == 1
        assert t.dirty_bytes() == 0
        assert t.fetch_and_clear() == []
        assert t.generation == 2


def test_adjacent_marks_merge(tracked_image):
    with Tracker.open(tracked_image) as t:
        t.mark(G, G)
        t.mark(2 * G, 1)
        t.mark(3 * G - 1, 2)  # touches 2 and 3
        assert t.dirty_extents() == [(G, 3 * G)]


def test_mark_crossing_word_boundary(make_image):
    img = make_image(200 * 4096)
    with Tracker.create(img, granularity=4096) as t:
        t.mark(60 * 4096 + 1, 10 * 4096)  # granules 60..70, across the 64-bit word
        t.mark(127 * 4096, 2 * 4096)  # 127, 128
        assert t.dirty_extents() == [(60 * 4096, 11 * 4096), (127 * 4096, 2 * 4096)]
        assert t.dirty_bytes() == 13 * 4096


def test_last_granule_is_clipped(make_image):
    size = 3 * G + 1000
    img = make_image(size)
    with Tracker.create(img) as t:
        t.mark(size - 1, 1)
        assert t.dirty_extents() == [(3 * G, 1000)]
        assert t.dirty_bytes() == 1000
        t.mark_all()
        assert t.dirty_extents() == [(0, size)]
        assert t.dirty_bytes() == size


def test_zero_length_mark_is_noop(tracked_image):
    with Tracker.open(tracked_image) as t:
        t.mark(123, 0)
        t.mark(4 * MiB, 0)
        assert t.dirty_bytes() == 0


@pytest.mark.parametrize(
    ("offset", "length"), [(4 * MiB, 1), (4 * MiB - 1, 2), (0, 4 * MiB + 1), (2**63, 2**63)]
)
def test_mark_past_end_is_einval(tracked_image, offset, length):
    with Tracker.open(tracked_image) as t:
        with pytest.raises(OSError) as ei:
            t.mark(offset, length)
        assert ei.value.errno == errno.EINVAL
        assert t.dirty_bytes() == 0
        t.mark(4 * MiB - 1, 1)  # the very last byte is fine
        assert t.dirty_extents() == [(4 * MiB - G, G)]


def test_negative_mark_is_valueerror(tracked_image):
    with Tracker.open(tracked_image) as t:
        with pytest.raises(ValueError):
            t.mark(-1, 10)
        with pytest.raises(ValueError):
            t.mark(0, -10)


def test_mark_all_and_resize(tracked_image):
    with Tracker.open(tracked_image) as t:
        t.mark_all()
        assert t.dirty_extents() == [(0, 4 * MiB)]
        t.fetch_and_clear()
        t.resize(4 * MiB + 100)  # grow: the new bytes are dirty
        assert t.image_size == 4 * MiB + 100
        assert t.dirty_extents() == [(4 * MiB, 100)]
        t.fetch_and_clear()
        t.mark(0, G)
        t.mark(2 * MiB, 2 * MiB)
        t.resize(MiB + 10)  # shrink: bits past the end go, the new last granule is dirty
        assert t.image_size == MiB + 10
        assert t.dirty_extents() == [(0, G), (MiB, 10)]
        with pytest.raises(OSError) as ei:
            t.mark(MiB + 10, 1)
        assert ei.value.errno == errno.EINVAL


def test_two_handles_share_one_bitmap(tracked_image):
    with Tracker.open(tracked_image) as a, Tracker.open(tracked_image) as b:
        a.mark(5 * G, 1)
        assert b.dirty_extents() == [(5 * G, G)]
        assert b.fetch_and_clear() == [(5 * G, G)]
        assert a.dirty_bytes() == 0
        assert a.generation == b.generation == 1


def test_bitmap_persists_across_close(tracked_image):
    with Tracker.open(tracked_image) as t:
        t.mark(7 * G, 3 * G)
        t.fetch_and_clear()
        t.mark(G, 1)
        series = t.series
    with Tracker.open(tracked_image) as t:
        assert t.dirty_extents() == [(G, G)]
        assert t.generation == 1
        assert t.series == series
        assert t.consistent


def test_closed_tracker_refuses_use(tracked_image):
    t = Tracker.open(tracked_image)
    t.close()
    t.close()  # idempotent
    with pytest.raises(ValueError):
        t.mark(0, 1)
    with pytest.raises(ValueError):
        t.dirty_extents()
    with Tracker.open(tracked_image) as t2:
        pass
    with pytest.raises(ValueError):
        t2.dirty_bytes()


def test_fetch_and_clear_array(tracked_image):
    with Tracker.open(tracked_image) as t:
        t.mark(0, 3 * G)
        arr = t.fetch_and_clear_array()
        assert arr.dtype.names == ("offset", "length")
        assert arr.tolist() == [(0, 3 * G)]
        assert t.dirty_bytes() == 0


def test_open_missing_sidecar(tmp_image):
    with pytest.raises(FileNotFoundError) as ei:
        Tracker.open(tmp_image)
    assert ei.value.errno == errno.ENOENT
    assert ei.value.filename == sidecar_path(tmp_image)


def test_open_missing_image(tmp_path):
    with pytest.raises(FileNotFoundError):
        Tracker.open(tmp_path / "nope.img")
    with pytest.raises(FileNotFoundError):
        Tracker.create(tmp_path / "nope.img")
    with pytest.raises(FileNotFoundError):
        TrackedImage(tmp_path / "nope.img")
    assert os.listdir(tmp_path) == []


def test_image_must_be_regular_file(tmp_path):
    with pytest.raises(OSError):
        Tracker.create(tmp_path)
    assert not os.path.exists(sidecar_path(tmp_path))


# -- TrackedImage ---------------------------------------------------------------


def test_tracked_image_creates_sidecar(tmp_image):
    assert not os.path.exists(sidecar_path(tmp_image))
    with TrackedImage(tmp_image, granularity=8192) as img:
        assert img.tracker.granularity == 8192
        assert img.tracker.live_writers() == 1
        assert stat.S_IMODE(os.stat(sidecar_path(tmp_image)).st_mode) == 0o600
    with Tracker.open(tmp_image) as t:
        assert t.granularity == 8192
        assert t.live_writers() == 0  # a clean close released the slot
        assert t.consistent


def test_pwrite_pread_round_trip(tracked_image):
    with TrackedImage(tracked_image) as img:
        assert img.pwrite(b"hello", 3 * G + 10) == 5
        assert img.pwrite(bytearray(b"x" * 100), 0) == 100
        assert img.pwrite(memoryview(b"abcdef")[2:], 9 * G - 2) == 4  # crosses granules 8/9
        assert img.pread(5, 3 * G + 10) == b"hello"
        assert img.pread(100, 0) == b"x" * 100
        assert img.pread(4, 9 * G - 2) == b"cdef"
        assert img.pread(10, 4 * MiB - 4) == b"\0" * 4  # short only at end of file
        assert img.pread(10, 5 * MiB) == b""
        assert img.size == 4 * MiB
    with Tracker.open(tracked_image) as t:
        assert t.dirty_extents() == [(0, G), (3 * G, G), (8 * G, 2 * G)]
        assert t.consistent
    assert read_at(tracked_image, 3 * G + 10, 5) == b"hello"


def test_pwrite_numpy_buffer(tracked_image):
    np = pytest.importorskip("numpy")
    data = np.arange(1000, dtype=np.uint32)
    with TrackedImage(tracked_image) as img:
        assert img.pwrite(data, G) == 4000
        assert img.pread(4000, G) == data.tobytes()


def test_zero_length_pwrite(tracked_image):
    with TrackedImage(tracked_image) as img:
        assert img.pwrite(b"", 123) == 0
        assert img.tracker.dirty_bytes() == 0


def test_pwrite_past_end_grows(tracked_image):
    with TrackedImage(tracked_image) as img:
        img.tracker.fetch_and_clear()
        img.pwrite(b"tail", 4 * MiB + 3 * G + 1)
        new_size = 4 * MiB + 3 * G + 5
        assert img.size == new_size
        assert img.tracker.image_size == new_size
        # every granule between the old end and the new one is dirty
        assert img.tracker.dirty_extents() == [(4 * MiB, 3 * G + 5)]
        assert img.pread(4, new_size - 4) == b"tail"
    with Tracker.open(tracked_image) as t:
        assert t.consistent
        assert t.image_size == new_size


def test_pwrite_far_past_end_grows_sidecar(make_image):
    # the bitmap outgrows its first page: the sidecar file must grow with it
    img_path = make_image(4096)
    with TrackedImage(img_path, granularity=4096) as img:
        far = 3 * 32768 * 4096 + 5  # three bitmap pages further on
        img.pwrite(b"z", far)
        assert img.tracker.image_size == far + 1
        # granule 0 gained no bytes; everything after the old end is dirty
        assert img.tracker.dirty_extents() == [(4096, far + 1 - 4096)]
        img.tracker.fetch_and_clear()
        img.pwrite(b"y", 40000 * 4096)
        assert img.tracker.dirty_extents() == [(40000 * 4096, 4096)]
    assert os.path.getsize(sidecar_path(img_path)) >= 8192 + 4 * 4096


def test_discard(tracked_image):
    with TrackedImage(tracked_image) as img:
        img.pwrite(b"\xff" * (3 * G), G)
        img.tracker.fetch_and_clear()
        img.discard(G + 100, G)
        assert img.pread(100, G) == b"\xff" * 100
        assert img.pread(G, G + 100) == b"\0" * G
        assert img.pread(10, 2 * G + 100) == b"\xff" * 10
        assert img.tracker.dirty_extents() == [(G, 2 * G)]
        assert img.size == 4 * MiB  # a discard never changes the size
        img.discard(0, 0)
        with pytest.raises(OSError) as ei:
            img.discard(4 * MiB - 1, 2)
        assert ei.value.errno == errno.EINVAL
        assert ei.value.filename == os.fspath(tracked_image)


def test_truncate(tracked_image):
    with TrackedImage(tracked_image) as img:
        img.pwrite(b"a" * 10, 3 * MiB)
        img.tracker.fetch_and_clear()
        img.truncate(MiB + 1)
        assert img.size == MiB + 1
        assert img.tracker.image_size == MiB + 1
        assert img.tracker.dirty_extents() == [(MiB, 1)]
        img.tracker.fetch_and_clear()
        img.truncate(2 * MiB)
        assert img.size == img.tracker.image_size == 2 * MiB
        assert img.tracker.dirty_extents() == [(MiB, MiB)]
        assert img.pread(10, 3 * MiB) == b""
        img.truncate(0)
        assert img.size == img.tracker.image_size == 0
        assert img.tracker.dirty_bytes() == 0
        assert img.tracker.dirty_extents() == []
    with Tracker.open(tracked_image) as t:
        assert t.consistent


def test_flush_syncs_the_image(tracked_image, monkeypatch):
    """flush() makes the image's completed writes durable: an fsync or
    fdatasync of the image itself (a read-back alone could not tell)."""
    synced: list[int] = []
    for name in ("fsync", "fdatasync"):
        real = getattr(os, name)

        def spy(fd, real=real):
            synced.append(os.fstat(fd).st_ino)
            return real(fd)

        monkeypatch.setattr(os, name, spy)
    with TrackedImage(tracked_image) as img:
        img.pwrite(b"durable", 0)
        before = list(synced)
        img.flush()
        assert os.stat(tracked_image).st_ino in synced[len(before):]
        assert img.pread(7, 0) == b"durable"
    img.close()  # idempotent


def test_closed_image_refuses_use(tracked_image):
    img = TrackedImage(tracked_image)
    img.close()
    with pytest.raises((ValueError, OSError)):
        img.pwrite(b"x", 0)
    with pytest.raises((ValueError, OSError)):
        img.pread(1, 0)
    with pytest.raises((ValueError, OSError)):
        img.discard(0, 1)
    with pytest.raises((ValueError, OSError)):
        img.flush()
    with Tracker.open(tracked_image) as t:
        assert t.dirty_bytes() == 0
        assert t.live_writers() == 0


def test_context_manager_closes_on_error(tracked_image):
    with pytest.raises(RuntimeError), TrackedImage(tracked_image) as img:
        assert img.tracker.live_writers() == 1
        raise RuntimeError("boom")
    with Tracker.open(tracked_image) as t:
        assert t.live_writers() == 0
        assert t.consistent


def test_reader_handle_cannot_write(tracked_image):
    # only a writer-registered handle may write: otherwise a crash mid-write
    # would go unnoticed (I4)
    with Tracker.open(tracked_image) as t:
        fd = os.open(tracked_image, os.O_RDWR)
        try:
            pwrite = _writer.pwrite_function(t._h, fd, os.fspath(tracked_image))
            with pytest.raises(OSError) as ei:
                pwrite(b"x", 0)
            assert ei.value.errno == errno.EBADF
        finally:
            os.close(fd)
        assert t.dirty_bytes() == 0


def test_writers_are_counted(tracked_image):
    with TrackedImage(tracked_image) as a, Tracker.open(tracked_image, writer=True) as b:
        assert b.live_writers() == 2
        a.pwrite(b"x", 0)
        assert b.info().live_writers == 2
    with Tracker.open(tracked_image) as t:
        assert t.live_writers() == 0


# -- errors ---------------------------------------------------------------------


def test_error_classes():
    for cls in (blockmirror.SidecarCorruptError, blockmirror.SidecarUnsafeError):
        assert issubclass(cls, OSError)
        assert issubclass(cls, BlockMirrorError)
        assert issubclass(cls, blockmirror.SidecarError)
    e = blockmirror.SidecarCorruptError("bad", "/x.cbt")
    assert e.errno == errno.EUCLEAN and e.filename == "/x.cbt"
    e = blockmirror.SidecarUnsafeError("unsafe", "/x.cbt")
    assert e.errno == errno.EPERM and e.filename == "/x.cbt"


def test_pwrite_error_carries_errno_and_path(tracked_image):
    with TrackedImage(tracked_image) as img:
        with pytest.raises(OSError) as ei:
            img.pwrite(b"x", MAX_IMAGE_SIZE)
        assert ei.value.errno == errno.EFBIG
        assert ei.value.filename == os.fspath(tracked_image)
        assert "1 PiB" in ei.value.strerror
        with pytest.raises(OSError) as ei:
            img.truncate(MAX_IMAGE_SIZE + 1)
        assert ei.value.errno == errno.EFBIG
        assert ei.value.filename == os.fspath(tracked_image)
        assert img.tracker.dirty_bytes() == 0
        assert img.size == 4 * MiB


def test_pwrite_to_readonly_fd_fails_but_marks(tracked_image):
    # a failed write is still marked (part of it may have landed)
    with Tracker.open(tracked_image, writer=True) as t:
        fd = os.open(tracked_image, os.O_RDONLY)
        try:
            pwrite = _writer.pwrite_function(t._h, fd, os.fspath(tracked_image))
            with pytest.raises(OSError) as ei:
                pwrite(b"x" * 10, 2 * G)
            assert ei.value.errno == errno.EBADF
            assert ei.value.filename == os.fspath(tracked_image)
        finally:
            os.close(fd)
        assert t.dirty_extents() == [(2 * G, G)]


def test_resize_past_limit(tracked_image):
    with Tracker.open(tracked_image) as t:
        with pytest.raises(OSError) as ei:
            t.resize(MAX_IMAGE_SIZE + 1)
        assert ei.value.errno == errno.EFBIG
        assert t.image_size == 4 * MiB
