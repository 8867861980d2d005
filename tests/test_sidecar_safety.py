"""I5, the sidecar is a trust boundary: a sidecar that is corrupt, foreign,
truncated, writable by others, owned by someone else or a symlink is refused
with a clear error, never a crash and never a silently usable tracker."""

from __future__ import annotations

import errno
import multiprocessing as mp
import os
import queue
import stat
import struct

import pytest

from blockmirror import (
    BlockMirrorError,
    SidecarCorruptError,
    SidecarUnsafeError,
    TrackedImage,
    Tracker,
    sidecar_path,
)
from blockmirror._bindings import tracker as _tracker_c
from blockmirror._bindings._ffi import lib
from blockmirror.tracking.tracker import MAX_IMAGE_SIZE

MiB = 1024 * 1024
NOBODY = 65534

# The header layout (csrc/bm_internal.h, struct bm_header). The checksum is
# FNV-1a 64 over the bytes before it; test_layout_assumptions checks these.
OFF_VERSION = 8
OFF_GRANULARITY = 16
OFF_SHIFT = 20
OFF_SERIES = 40
OFF_IMAGE_DEV = 64
OFF_IMAGE_INO = 72
OFF_IMAGE_BTIME = 80
OFF_CHECKSUM = 88
OFF_IMAGE_SIZE = 96
BITMAP_OFFSET = 40960  # header page, control page, 8 interlock pages
FORMAT_VERSION = lib.BM_FORMAT_VERSION

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")


def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def patch(path: str, offset: int, data: bytes, *, fix_checksum: bool = False) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
        if fix_checksum:
            f.seek(0)
            head = f.read(OFF_CHECKSUM)
            f.seek(OFF_CHECKSUM)
            f.write(struct.pack("<Q", fnv1a64(head)))


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def assert_refused(image, cls, *words):
    """Every way in refuses it, with CLS, and leaves the sidecar as it was."""
    side = sidecar_path(image)
    before = read_bytes(side) if os.path.isfile(side) and not os.path.islink(side) else None
    for opener in (
        lambda: Tracker.open(image),
        lambda: Tracker.open(image, writer=True),
        lambda: TrackedImage(image),
    ):
        with pytest.raises(cls) as ei:
            opener()
        e = ei.value
        assert isinstance(e, OSError)
        assert isinstance(e, BlockMirrorError)
        assert e.errno == (errno.EUCLEAN if cls is SidecarCorruptError else errno.EPERM)
        assert e.filename == side
        message = str(e).lower()
        for w in words:
            assert w in message, f"{w!r} not in {message!r}"
    if before is not None:
        assert read_bytes(side) == before, "a refused sidecar must be left untouched"


@pytest.fixture
def side(tracked_image) -> str:
    return sidecar_path(tracked_image)


def test_layout_assumptions(tracked_image, side):
    raw = read_bytes(side)
    assert raw[:8] == b"BMCBT\r\n\x1a"
    assert struct.unpack_from("<I", raw, OFF_VERSION)[0] == FORMAT_VERSION
    assert struct.unpack_from("<I", raw, OFF_GRANULARITY)[0] == 65536
    assert struct.unpack_from("<I", raw, OFF_SHIFT)[0] == 16
    assert struct.unpack_from("<Q", raw, OFF_CHECKSUM)[0] == fnv1a64(raw[:OFF_CHECKSUM])
    assert struct.unpack_from("<Q", raw, OFF_IMAGE_SIZE)[0] == 4 * MiB
    st = os.stat(tracked_image)
    assert struct.unpack_from("<QQ", raw, OFF_IMAGE_DEV) == (st.st_dev, st.st_ino)
    with Tracker.open(tracked_image) as t:
        assert t.series == raw[OFF_SERIES : OFF_SERIES + 16].hex()


# -- creation ---------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_created_sidecar_is_0600(tmp_image, umask):
    old = os.umask(umask)
    try:
        Tracker.create(tmp_image).close()
    finally:
        os.umask(old)
    st = os.stat(sidecar_path(tmp_image))
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.stat(tmp_image).st_uid


def test_writer_created_sidecar_is_0600(tmp_image):
    old = os.umask(0)
    try:
        TrackedImage(tmp_image).close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(sidecar_path(tmp_image)).st_mode) == 0o600


def test_create_over_existing_sidecar(tracked_image, side):
    with Tracker.open(tracked_image) as t:
        t.mark(0, 1)
    before = read_bytes(side)
    with pytest.raises(FileExistsError) as ei:
        Tracker.create(tracked_image)
    assert ei.value.filename == side
    assert read_bytes(side) == before  # the existing bitmap is not clobbered


def test_create_over_symlink_does_not_follow(tmp_image, tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    os.symlink(victim, sidecar_path(tmp_image))
    with pytest.raises(FileExistsError):
        Tracker.create(tmp_image)
    assert victim.read_bytes() == b"precious"


def test_dangling_symlink_is_not_created_through(tmp_image, tmp_path):
    target = tmp_path / "elsewhere.cbt"
    os.symlink(target, sidecar_path(tmp_image))
    with pytest.raises(OSError):
        Tracker.create(tmp_image)
    with pytest.raises(SidecarUnsafeError):
        TrackedImage(tmp_image)
    assert not target.exists()


@pytest.mark.parametrize("granularity", [0, 1, 1000, 2048, 3 * 4096, 65536 + 4096, 128 << 20])
def test_bad_granularity(tmp_image, granularity):
    with pytest.raises(ValueError):
        Tracker.create(tmp_image, granularity=granularity)
    with pytest.raises(ValueError):
        TrackedImage(tmp_image, granularity=granularity)
    assert not os.path.exists(sidecar_path(tmp_image))


def test_bad_granularity_in_c(tmp_image):
    # the C layer checks on its own too, and leaves nothing behind
    fd = os.open(tmp_image, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as ei:
            _tracker_c.create(sidecar_path(tmp_image), fd, 4 * MiB, 3000)
        assert ei.value.errno == errno.EINVAL
        with pytest.raises(OSError) as ei:
            _tracker_c.create(sidecar_path(tmp_image), fd, MAX_IMAGE_SIZE + 1, 65536)
        assert ei.value.errno == errno.EFBIG
    finally:
        os.close(fd)
    assert not os.path.exists(sidecar_path(tmp_image))


# -- corrupt and foreign files ----------------------------------------------------


def test_flipped_header_byte(tracked_image, side):
    raw = read_bytes(side)
    patch(side, OFF_SERIES + 3, bytes([raw[OFF_SERIES + 3] ^ 0x01]))
    assert_refused(tracked_image, SidecarCorruptError, "corrupt")


@pytest.mark.parametrize("offset", [OFF_GRANULARITY, OFF_SHIFT, 24, 32, 56, OFF_IMAGE_DEV,
                                    OFF_IMAGE_INO, OFF_IMAGE_BTIME, OFF_CHECKSUM])
def test_flipped_byte_anywhere_in_checksummed_part(tracked_image, side, offset):
    raw = read_bytes(side)
    patch(side, offset, bytes([raw[offset] ^ 0x10]))
    assert_refused(tracked_image, SidecarCorruptError)


def test_valid_checksum_bad_granularity(tracked_image, side):
    # a header that checksums fine but says nonsense is still refused
    patch(side, OFF_GRANULARITY, struct.pack("<I", 3000), fix_checksum=True)
    assert_refused(tracked_image, SidecarCorruptError)


def test_valid_checksum_shift_disagrees(tracked_image, side):
    patch(side, OFF_SHIFT, struct.pack("<I", 12), fix_checksum=True)
    assert_refused(tracked_image, SidecarCorruptError)


def test_bad_magic(tracked_image, side):
    patch(side, 0, b"NOTBMCBT")
    assert_refused(tracked_image, SidecarCorruptError, "not a blockmirror sidecar")


def test_foreign_file(tracked_image, side):
    os.unlink(side)
    fd = os.open(side, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, b"-----BEGIN SOMETHING ELSE-----\n" + os.urandom(3 * 4096))
    os.close(fd)
    assert_refused(tracked_image, SidecarCorruptError)


def test_text_mode_mangled(tracked_image, side):
    raw = read_bytes(side)
    with open(side, "wb") as f:
        f.write(raw.replace(b"\r\n", b"\n", 1))
    assert_refused(tracked_image, SidecarCorruptError)


def test_wrong_version(tracked_image, side):
    # checksum recomputed, so it is the version check that refuses it
    # older formats (a sidecar from before an upgrade) and newer ones alike
    for version in sorted({0, FORMAT_VERSION - 1, FORMAT_VERSION + 1, 2**32 - 1}):
        patch(side, OFF_VERSION, struct.pack("<I", version), fix_checksum=True)
        assert_refused(tracked_image, SidecarCorruptError, f"version {version}")


@pytest.mark.parametrize("length", [0, 7, 100, 4096, 8191])
def test_truncated_header(tracked_image, side, length):
    os.truncate(side, length)
    assert_refused(tracked_image, SidecarCorruptError, "truncated")


def test_truncated_bitmap(make_image):
    # 1 GiB at 4 KiB granules: 64 chunks of 4096 granules, each 512 bytes of
    # dirty bits, 16 KiB of eras and their 8-byte checksum (265 pages in all)
    img = make_image(1 << 30)
    Tracker.create(img, granularity=4096).close()
    side = sidecar_path(img)
    assert os.path.getsize(side) == BITMAP_OFFSET + 265 * 4096
    for cut in (BITMAP_OFFSET + 263 * 4096, BITMAP_OFFSET + 4096, BITMAP_OFFSET):
        os.truncate(side, cut)
        assert_refused(img, SidecarCorruptError, "truncated")


def test_image_size_points_past_bitmap(tracked_image, side):
    # the image size is not checksummed (it changes in use); a value the file
    # cannot back would make the bitmap run off the end of the mapping
    patch(side, OFF_IMAGE_SIZE, struct.pack("<Q", 1 << 40))
    assert_refused(tracked_image, SidecarCorruptError, "truncated")
    patch(side, OFF_IMAGE_SIZE, struct.pack("<Q", 2**64 - 1))
    assert_refused(tracked_image, SidecarCorruptError)


def test_sidecar_is_a_directory(tmp_image):
    os.mkdir(sidecar_path(tmp_image))
    with pytest.raises(OSError):
        Tracker.open(tmp_image)
    with pytest.raises(OSError):
        TrackedImage(tmp_image)


def test_sidecar_is_a_fifo(tmp_image):
    os.mkfifo(sidecar_path(tmp_image), 0o600)
    assert_refused(tmp_image, SidecarUnsafeError, "not a regular file")


# -- permissions and ownership ------------------------------------------------------


@pytest.mark.parametrize("mode", [0o666, 0o602, 0o620, 0o660, 0o622])
def test_writable_by_others(tracked_image, side, mode):
    os.chmod(side, mode)
    assert_refused(tracked_image, SidecarUnsafeError, "writable by group or others")


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o644, 0o400])
def test_readable_by_others_is_fine(tracked_image, side, mode):
    os.chmod(side, mode)
    with Tracker.open(tracked_image) as t:
        t.mark(0, 1)
        assert t.dirty_bytes() == 65536


@needs_root
def test_owned_by_another_user(tracked_image, side):
    os.chown(side, NOBODY, -1)
    assert_refused(tracked_image, SidecarUnsafeError, "owned by uid 65534")


@needs_root
def test_image_owned_by_another_user(tracked_image, side):
    # the sidecar must belong to the image's owner, whoever opens it
    os.chown(tracked_image, NOBODY, -1)
    assert_refused(tracked_image, SidecarUnsafeError, "owned by uid 0")


@needs_root
def test_create_gives_sidecar_to_image_owner(tmp_image):
    os.chown(tmp_image, NOBODY, NOBODY)
    with Tracker.create(tmp_image) as t:
        t.mark(0, 1)
    assert os.stat(sidecar_path(tmp_image)).st_uid == NOBODY
    with Tracker.open(tmp_image) as t:
        assert t.dirty_bytes() == 65536


def test_symlinked_sidecar(make_image):
    real = make_image(4 * MiB, "real.img")
    Tracker.create(real).close()
    img = make_image(4 * MiB, "disk.img")
    os.symlink(sidecar_path(real), sidecar_path(img))
    assert_refused(img, SidecarUnsafeError, "symbolic link")
    with Tracker.open(real) as t:
        assert t.dirty_bytes() == 0  # nothing reached the link's target


def test_refusal_is_never_silently_usable(tracked_image, side):
    """After every refusal the image can still be tracked once someone
    removes the bad sidecar: refusal is loud, not a dead end."""
    os.chmod(side, 0o666)
    with pytest.raises(SidecarUnsafeError):
        TrackedImage(tracked_image)
    os.unlink(side)
    with TrackedImage(tracked_image) as img:
        img.pwrite(b"ok", 0)
        assert img.tracker.dirty_extents() == [(0, 65536)]


# -- a damaged control block ------------------------------------------------------

CONTROL_OFFSET = 4096


def _write_once(image: str, results) -> None:
    try:
        with TrackedImage(image) as img:
            img.pwrite(b"still works", 0)
        results.put("done")
    except OSError as e:
        results.put(f"error {e.errno}")


@pytest.mark.parametrize("fill", [b"\xff", b"\x01", b"\x03"])
def test_garbage_control_block(tracked_image, side, fill):
    """The control block is not checksummed (it changes all the time). Garbage
    there - dead writer slots, an absurd state, lease, throttle or redirect -
    must not crash, hang or silently pass for clean: the writer either writes
    or fails with an error, and the sidecar reads as inconsistent."""
    patch(side, CONTROL_OFFSET, fill * 4096)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    p = ctx.Process(target=_write_once, args=(os.fspath(tracked_image), results))
    p.start()
    try:
        outcome = results.get(timeout=20)
    except queue.Empty:
        pytest.fail("a writer hung on a garbage control block")
    finally:
        p.kill()
        p.join()
    assert outcome == "done" or outcome.startswith("error ")
    with Tracker.open(tracked_image) as t:
        assert t.consistent is False  # the garbage writer slots are dead writers
