"""Bindings of the sidecar, the dirty bitmap, change ids and the copier's
control block (csrc/cbt.c, bitmap.c, control.c)."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

from blockmirror._bindings._ffi import SCAN_CHUNK, CData, check, error_from_c, ffi, lib, scan_all
from blockmirror.errors import ChangeIdInvalidError

if TYPE_CHECKING:
    from blockmirror.extents import ExtentArray

Handle: TypeAlias = CData
"""A ``bm_tracker *`` owned by ffi.gc: bm_close runs with its last reference."""

DEFAULT_GRANULARITY: int = lib.BM_DEFAULT_GRANULARITY
MIN_GRANULARITY: int = lib.BM_MIN_GRANULARITY
MAX_GRANULARITY: int = lib.BM_MAX_GRANULARITY
MAX_IMAGE_SIZE: int = lib.BM_MAX_IMAGE_SIZE
FLAG_UNCLEAN: int = lib.BM_FLAG_UNCLEAN
FLAG_ERAS_DAMAGED: int = lib.BM_FLAG_ERAS_DAMAGED
FLAG_NOT_THIS_IMAGE: int = lib.BM_FLAG_NOT_THIS_IMAGE
FORMAT_VERSION: int = lib.BM_FORMAT_VERSION
REDIRECT_MAX: int = lib.BM_REDIRECT_MAX
MAX_LEASE_S: float = lib.BM_MAX_LEASE_NS / 1e9
SIDECAR_SUFFIX: str = os.fsdecode(ffi.string(lib.bm_sidecar_suffix()))
STATE_NAMES = {
    lib.BM_STATE_RUNNING: "running",
    lib.BM_STATE_FREEZING: "freezing",
    lib.BM_STATE_FROZEN: "frozen",
    lib.BM_STATE_REDIRECTED: "redirected",
}


@dataclass(frozen=True)
class TrackerInfo:
    """What the sidecar's header and control block say (``bm_info``)."""

    version: int
    granularity: int
    image_size: int
    generation: int
    series: str  # 32 hex digits
    flags: int  # FLAG_*
    state: str  # a STATE_NAMES value
    live_writers: int  # slots claimed as of the last sweep (see sweep_writers)
    copier_pid: int  # 0: no copier holds a freeze
    throttle_bytes_per_s: int  # the writers' throttle (0: none)
    last_write_ns: int  # CLOCK_REALTIME when the latest tracked write ended (0: none yet)
    bytes_written: int = 0  # by tracked pwrites, all writers, ever: a rate gauge

    @property
    def unclean(self) -> bool:
        return bool(self.flags & FLAG_UNCLEAN)

    @property
    def eras_damaged(self) -> bool:
        """Eras changed while sealed: no change id can be trusted."""
        return bool(self.flags & FLAG_ERAS_DAMAGED)

    @property
    def not_this_image(self) -> bool:
        """The sidecar records another file than the image it was opened with."""
        return bool(self.flags & FLAG_NOT_THIS_IMAGE)


def create(path: str, image_fd: int, image_size: int, granularity: int) -> None:
    """A new sidecar at PATH for the image open as IMAGE_FD (bound to its
    device and inode, owned by its owner)."""
    if lib.bm_create(os.fsencode(path), image_fd, image_size, granularity) < 0:
        raise error_from_c(path, sidecar=True)


def sidecar_bytes(image_size: int, granularity: int) -> int:
    return check(lib.bm_sidecar_bytes(image_size, granularity))


def open_tracker(path: str, writer: bool, image_fd: int) -> Handle:
    """Open PATH for the image open as IMAGE_FD (-1: none, readers only)."""
    flags = lib.BM_OPEN_WRITER if writer else lib.BM_OPEN_READER
    handle = lib.bm_open(os.fsencode(path), flags, image_fd)
    if handle == ffi.NULL:
        raise error_from_c(path, sidecar=True)
    owned: Handle = ffi.gc(handle, lib.bm_close)
    return owned


def open_redirect_target(handle: Handle, writer: bool) -> tuple[Handle, int, str]:
    """Follow HANDLE's redirect safely (in C: no symbolic link on the path,
    the same owner, a sidecar recording the move): the target's tracker, an
    O_RDWR fd of the target image (the caller's to close) and its path."""
    target = redirect_target(handle)
    flags = lib.BM_OPEN_WRITER if writer else lib.BM_OPEN_READER
    fd = ffi.new("int *", -1)
    new = lib.bm_open_redirect_target(handle, flags, fd)
    if new == ffi.NULL:
        raise error_from_c(target, sidecar=True)
    owned: Handle = ffi.gc(new, lib.bm_close)
    return owned, int(fd[0]), target


def close(handle: Handle) -> None:
    ffi.release(handle)  # runs bm_close now instead of at garbage collection


def info(handle: Handle) -> TrackerInfo:
    """What the control block holds now; reads only (no /proc sweep)."""
    out: Any = ffi.new("bm_info *")  # a C struct: fields typed in blockmirror.h
    check(lib.bm_get_info(handle, out))
    return TrackerInfo(
        version=int(out.version),
        granularity=int(out.granularity),
        image_size=int(out.image_size),
        generation=int(out.generation),
        series=bytes(ffi.buffer(out.series, 16)).hex(),
        flags=int(out.flags),
        state=STATE_NAMES.get(out.state, f"unknown({out.state})"),
        live_writers=int(out.live_writers),
        copier_pid=int(out.copier_pid),
        throttle_bytes_per_s=int(out.throttle_bytes_per_s),
        last_write_ns=int(out.last_write_ns),
        bytes_written=int(out.bytes_written),
    )


def reset(handle: Handle) -> None:
    check(lib.bm_reset(handle))


def _check_range(offset: int, length: int) -> None:
    if offset < 0 or length < 0:
        raise ValueError(f"offset and length must be >= 0, got {offset}, {length}")


def mark(handle: Handle, offset: int, length: int) -> None:
    _check_range(offset, length)
    check(lib.bm_mark(handle, offset, length))


def clear_range(handle: Handle, offset: int, length: int) -> None:
    _check_range(offset, length)
    check(lib.bm_clear_range(handle, offset, length))


def mark_all(handle: Handle) -> None:
    check(lib.bm_mark_all(handle))


def dirty_bytes(handle: Handle) -> int:
    return check(lib.bm_dirty_bytes(handle))


def resize(handle: Handle, size: int) -> None:
    check(lib.bm_resize(handle, size))


def scan_extents(handle: Handle, clear: bool, chunk: int = SCAN_CHUNK) -> ExtentArray:
    """All dirty extents; with CLEAR taken atomically (bm_fetch_and_clear),
    otherwise only read (bm_snapshot)."""
    scan = lib.bm_fetch_and_clear if clear else lib.bm_snapshot
    return scan_all(lambda cursor, out, room: scan(handle, cursor, out, room), chunk)


def _check_eras(rc: int) -> int:
    """Like check, but EBADMSG (the eras fail their checksums) is a change id
    that cannot be trusted."""
    if rc < 0 and ffi.errno == errno.EBADMSG:
        raise ChangeIdInvalidError(str(error_from_c().strerror))
    return check(rc)


def new_change_id(handle: Handle) -> int:
    """Take a change id: the generation now, which then moves on. Raises
    ChangeIdInvalidError when the eras cannot be trusted."""
    out = ffi.new("uint64_t *")
    _check_eras(lib.bm_new_change_id(handle, out))
    return int(out[0])


def changed_since(handle: Handle, since: int, chunk: int = SCAN_CHUNK) -> ExtentArray:
    """Extents of granules marked after generation SINCE (eras > SINCE).
    Raises ChangeIdInvalidError when the eras cannot be trusted."""
    return scan_all(
        lambda cursor, out, room: _check_eras(
            lib.bm_changed_since(handle, since, cursor, out, room)), chunk)


def eras_trusted(handle: Handle) -> bool:
    """Whether the eras pass their checks now (bm_verify_eras; a mismatch is
    recorded in the sidecar)."""
    if lib.bm_verify_eras(handle) == 0:
        return True
    if ffi.errno == errno.EBADMSG:
        return False
    raise error_from_c()


def freeze(handle: Handle, lease_s: float) -> None:
    check(lib.bm_freeze(handle, int(lease_s * 1e9)))


def freeze_check(handle: Handle) -> None:
    check(lib.bm_freeze_check(handle))


def thaw(handle: Handle) -> None:
    check(lib.bm_thaw(handle))


def redirect(handle: Handle, target: str, target_handle: Handle) -> None:
    """Send HANDLE's writers to TARGET (a symlink-free absolute path), the
    image TARGET_HANDLE was opened with."""
    check(lib.bm_redirect(handle, os.fsencode(target), target_handle))


def redirect_uri(handle: Handle, uri: str) -> None:
    """Send HANDLE's frozen writers to the NBD export URI (no user info)."""
    check(lib.bm_redirect_uri(handle, uri.encode()))


def redirect_uri_to_follow(handle: Handle, path: str) -> str:
    """The export URI HANDLE's writers were sent to, if this process may
    follow it (it owns the image; csrc/redirect.c); else ``SidecarUnsafeError``
    (EPERM), or OSError EXDEV for a redirect to a file."""
    buf = ffi.new("char[]", lib.BM_REDIRECT_MAX)
    if lib.bm_redirect_uri_to_follow(handle, buf, lib.BM_REDIRECT_MAX) < 0:
        raise error_from_c(path, sidecar=True)
    return os.fsdecode(ffi.string(buf))


def state(handle: Handle) -> str:
    """The control-block state's name (one atomic load in C)."""
    st = check(lib.bm_get_state(handle))
    return STATE_NAMES.get(st, f"unknown({st})")


def redirected(handle: Handle) -> bool:
    """True once writers were sent elsewhere (one atomic load in C)."""
    return bool(check(lib.bm_get_state(handle)) == lib.BM_STATE_REDIRECTED)


def redirect_target(handle: Handle) -> str:
    buf = ffi.new("char[]", lib.BM_REDIRECT_MAX)
    check(lib.bm_get_redirect(handle, buf, lib.BM_REDIRECT_MAX))
    return os.fsdecode(ffi.string(buf))


def set_throttle(handle: Handle, bytes_per_s: int) -> None:
    check(lib.bm_set_throttle(handle, max(0, int(bytes_per_s))))


def sweep_writers(handle: Handle) -> int:
    """Free the slots of dead writers, marking the sidecar unclean if any had
    it open (I4); the number of live writers. ``info`` never sweeps."""
    return check(lib.bm_sweep_writers(handle))
