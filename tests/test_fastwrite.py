"""TrackedImage.pwrite's hot path, ``blockmirror._fastwrite`` (issue 2, "Measure
it"): it is what an image uses when built, and it behaves like the cffi path
it replaces, which stays as the fallback. The behaviour tests run against both.
"""

from __future__ import annotations

import array
import errno
import os
import threading
import time

import pytest
from imagetools import read_at

from blockmirror import TrackedImage, Tracker
from blockmirror._bindings import writer as _writer
from blockmirror.migration import sync

MiB = 1 << 20
G = 65536  # the default granularity


@pytest.fixture(params=["fast", "cffi"])
def write_path(request, monkeypatch) -> str:
    """Images opened in the test use the fast path, or the cffi fallback as
    when the extension is not built."""
    if request.param == "cffi":
        monkeypatch.setattr(_writer, "_fastwrite", None)
    else:
        assert _writer._fastwrite is not None, "blockmirror._fastwrite was not built"
    return str(request.param)


def test_fast_path_is_built_and_used(tracked_image):
    """setup.py always builds it; without it the benchmark measures the fallback."""
    from blockmirror import _fastwrite

    with TrackedImage(tracked_image) as img:
        assert type(img.pwrite) is _fastwrite.Writer
        assert type(img._pwrite) is _fastwrite.Writer


def test_fallback_is_the_cffi_closure(tracked_image, monkeypatch):
    monkeypatch.setattr(_writer, "_fastwrite", None)
    with TrackedImage(tracked_image) as img:
        assert img.pwrite.__name__ == "pwrite"  # a Python function
        assert img.pwrite(b"cffi", 0) == 4
    assert read_at(tracked_image, 0, 4) == b"cffi"


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"bytes" * 1000, id="bytes"),
        pytest.param(bytearray(b"bytearray" * 500), id="bytearray"),
        pytest.param(memoryview(b"0123456789" * 700)[100:5100], id="memoryview-slice"),
        pytest.param(memoryview(array.array("I", range(2048))), id="memoryview-uint32"),
        pytest.param(b"", id="empty"),
    ],
)
def test_writes_all_buffer_types_and_tracks_them(tracked_image, write_path, data):
    raw = bytes(data)
    offset = 3 * G + 100
    with TrackedImage(tracked_image) as img:
        assert img.pwrite(data, offset) == len(raw)
        assert img.pread(len(raw), offset) == raw
        extents = img.tracker.dirty_extents()
    assert read_at(tracked_image, offset, len(raw)) == raw
    if raw:
        end = offset + len(raw)
        assert extents == [(3 * G, (end + G - 1) // G * G - 3 * G)]
    else:
        assert extents == []


def test_fast_and_cffi_paths_write_the_same(tracked_image):
    data = os.urandom(4096)
    with TrackedImage(tracked_image) as img:
        cffi = _writer.cffi_pwrite_function(img.tracker._h, img._fd, img.path)
        assert img.pwrite(data, 0) == cffi(data, 5 * G) == 4096
        assert img.pread(4096, 0) == img.pread(4096, 5 * G) == data
        assert img.tracker.dirty_extents() == [(0, G), (5 * G, G)]


@pytest.mark.parametrize(
    ("data", "offset", "error"),
    [
        ("text", 0, TypeError),
        (b"x", -1, OverflowError),
        (b"x", 2**64, OverflowError),
        (b"x", 1.0, TypeError),
        (memoryview(b"abcdef")[::2], 0, (TypeError, BufferError)),  # not contiguous
    ],
)
def test_bad_arguments_raise_before_writing(tracked_image, write_path, data, offset, error):
    with TrackedImage(tracked_image) as img:
        with pytest.raises(error):
            img.pwrite(data, offset)
        assert img.tracker.dirty_bytes() == 0


def test_failed_write_is_oserror_with_errno_and_path(tracked_image, write_path):
    with TrackedImage(tracked_image) as img:
        # Swap the image's fd for a read-only one: pwrite(2) fails with EBADF.
        read_only = os.open(tracked_image, os.O_RDONLY)
        os.dup2(read_only, img._fd)
        os.close(read_only)
        with pytest.raises(OSError) as ei:
            img.pwrite(b"x" * 4096, G)
        assert ei.value.errno == errno.EBADF
        assert ei.value.filename == img.path == os.fspath(tracked_image)
        assert "write of 4096 bytes at 65536 failed" in ei.value.strerror
        # I1: the range is marked even though the write failed (part may have landed).
        assert img.tracker.dirty_extents() == [(G, G)]


def test_other_c_errors_keep_errno_and_path(tracked_image, write_path):
    with TrackedImage(tracked_image) as img:
        # Refused by bm_pwrite itself, before any I/O: past the size limit.
        with pytest.raises(OSError) as ei:
            img.pwrite(b"x", 2**62)
        assert (ei.value.errno, ei.value.filename) == (errno.EFBIG, img.path)
        assert ei.value.strerror  # bm_last_error()'s reason, not empty
        assert img.tracker.dirty_bytes() == 0
        # From pwrite(2): the image's fd swapped for a pipe.
        r, w = os.pipe()
        try:
            os.dup2(w, img._fd)
            with pytest.raises(OSError) as ei:
                img.pwrite(b"x", 0)
            assert (ei.value.errno, ei.value.filename) == (errno.ESPIPE, img.path)
        finally:
            os.close(r)
            os.close(w)


def test_write_after_close_is_valueerror(tracked_image, write_path):
    img = TrackedImage(tracked_image)
    img.close()
    with pytest.raises(ValueError, match="closed"):
        img.pwrite(b"x", 0)
    with Tracker.open(tracked_image) as t:
        assert t.dirty_bytes() == 0


def test_write_through_an_earlier_reference_after_close_is_valueerror(tracked_image):
    """The fast path detaches from the C handle on close: a reference taken
    before close raises instead of writing through freed memory (the cffi
    closure cannot be detached, so this holds for the fast path only)."""
    img = TrackedImage(tracked_image)
    write = img.pwrite
    assert write.closed is False
    img.close()
    assert write.closed is True
    with pytest.raises(ValueError, match="closed"):
        write(b"x", 0)
    assert read_at(tracked_image, 0, 1) == b"\0"


def test_estale_goes_to_on_stale_with_the_same_arguments(tracked_image, make_image, write_path):
    target = make_image(4 * MiB, "moved.img")
    Tracker.create(target).close()
    calls = []

    def on_stale(data, offset):
        calls.append((data, offset))
        return "redirected"

    with TrackedImage(tracked_image) as img, Tracker.open(tracked_image) as copier:
        copier.freeze(10)
        copier.redirect(target)
        handle, fd = img.tracker._h, img._fd
        data, offset = bytearray(b"moved"), 7
        follow = _writer.pwrite_function(handle, fd, img.path, on_stale=on_stale)
        assert follow(data, offset) == "redirected"
        assert calls == [(data, offset)] and calls[0][0] is data
        plain = _writer.pwrite_function(handle, fd, img.path)
        with pytest.raises(OSError) as ei:
            plain(data, offset)
        assert ei.value.errno == errno.ESTALE
        assert ei.value.filename == img.path
        _writer.retire_pwrite_function(follow)
        _writer.retire_pwrite_function(plain)
    assert read_at(tracked_image, 0, 16) == b"\0" * 16


def test_follows_a_move(dirs, write_path):
    """sync --move while the image is held open: the next write lands in the
    moved image, tracked there, and the handle keeps its fast path."""
    src, dst = dirs
    image = src / "moving.img"
    with open(image, "wb") as f:
        f.truncate(8 * MiB)
    Tracker.create(image).close()
    with TrackedImage(image) as img:
        before = img.pwrite
        img.pwrite(b"before the move", 0)
        sync(image, dst, mode="move", target_downtime=0.5)
        assert img.pwrite(b"after the move", 2 * G) == 14  # follows the redirect
        assert img.path == str(dst / "moving.img")
        assert type(img.pwrite) is type(before) and img.pwrite is not before
        if write_path == "fast":
            assert before.closed  # detached from the old, closed tracker
        assert img.pwrite(b"and again", 3 * G) == 9
        assert (2 * G, 2 * G) in img.tracker.dirty_extents()
    assert not image.exists()
    assert read_at(dst / "moving.img", 0, 15) == b"before the move"
    assert read_at(dst / "moving.img", 2 * G, 14) == b"after the move"
    with Tracker.open(dst / "moving.img") as t:
        assert t.consistent
        assert t.live_writers() == 0


def test_write_blocked_in_a_freeze_releases_the_gil(tracked_image, write_path):
    """A write waiting out a freeze (I3) must not hold the GIL: other Python
    threads of the writer's process run meanwhile."""
    with TrackedImage(tracked_image) as img, Tracker.open(tracked_image) as copier:
        copier.freeze(5)
        result: list[object] = []

        def writer() -> None:
            result.append(img.pwrite(b"during the freeze", 4 * G))

        thread = threading.Thread(target=writer)
        start = time.monotonic()
        thread.start()
        time.sleep(0.3)  # the writer is in bm_pwrite's freeze wait by now
        # Python ran again long before the lease (5 s) ended, while the write waits:
        spins = 0
        while time.monotonic() - start < 0.5:
            spins += 1
        assert time.monotonic() - start < 2.5
        assert spins > 1000
        assert thread.is_alive() and result == []
        assert copier.dirty_bytes() == 0  # nothing slipped into the frozen image
        copier.thaw()
        thread.join(10)
        assert result == [17]
        assert copier.dirty_extents() == [(4 * G, G)]
    assert read_at(tracked_image, 4 * G, 17) == b"during the freeze"
