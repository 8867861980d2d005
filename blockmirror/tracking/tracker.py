"""Change-block tracking: the shared dirty bitmap kept in ``IMAGE.cbt``.

A ``Tracker`` is one process's handle on the sidecar beside an image. Any
number of processes may hold one at once (writers, a copier, backup tools);
the bitmap lives in a shared memory map and every change to it is atomic.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from typing import TYPE_CHECKING

from blockmirror import files
from blockmirror._bindings import copy as _copy
from blockmirror._bindings import mirror as _m
from blockmirror._bindings import tracker as _c
from blockmirror._bindings import writer as _w
from blockmirror._bindings.mirror import MirrorStatus
from blockmirror._bindings.tracker import (
    DEFAULT_GRANULARITY,
    MAX_GRANULARITY,
    MAX_IMAGE_SIZE,
    MIN_GRANULARITY,
    SIDECAR_SUFFIX,
    TrackerInfo,
)
from blockmirror._bindings.writer import PwriteFunction, StaleHandler
from blockmirror.closeable import Closeable
from blockmirror.errors import ChangeIdInvalidError, SidecarError
from blockmirror.extents import Extent, pairs
from blockmirror.tracking.changeid import ChangeId

if TYPE_CHECKING:  # numpy loads late (see blockmirror.extents)
    from blockmirror.extents import ExtentArray


def sidecar_path(image_path: str | os.PathLike[str]) -> str:
    """Where the sidecar of IMAGE_PATH lives (``IMAGE.cbt``, beside it)."""
    return os.fspath(image_path) + SIDECAR_SUFFIX


def sidecar_bytes(image_size: int, granularity: int) -> int:
    """The disk a sidecar covering IMAGE_SIZE at GRANULARITY takes (the C
    core's own layout)."""
    return _c.sidecar_bytes(image_size, granularity)


def _open_image(image_path: str) -> int:
    """An O_PATH fd of the image (no read permission needed, never blocks):
    the C side takes its owner, device and inode from it."""
    fd = os.open(image_path, os.O_PATH | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise IsADirectoryError(21, "image is not a regular file", image_path) if (
                stat.S_ISDIR(st.st_mode)
            ) else OSError(22, "image is not a regular file", image_path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _consistent(handle: _c.Handle, image_size: int | None) -> bool:
    """What Tracker.consistent says, for HANDLE (freshly swept)."""
    info = _c.info(handle)
    if info.unclean or info.eras_damaged or info.not_this_image:
        return False
    if not _c.eras_trusted(handle):
        return False
    # A file larger than the tracked size was written without tracking.
    return image_size is None or image_size <= info.image_size


class Tracker(Closeable):
    """A handle on an image's change-tracking sidecar.

    Create one with :meth:`create` (new sidecar, every granule clean) or
    :meth:`open` (existing sidecar, validated). Use as a context manager.
    """

    def __init__(self, handle: _c.Handle, image_path: str) -> None:
        self._handle: _c.Handle | None = handle
        self.image_path = image_path
        self.path = sidecar_path(image_path)
        self._granularity = _c.info(handle).granularity

    # -- lifetime -----------------------------------------------------------

    @classmethod
    def create(
        cls,
        image_path: str | os.PathLike[str],
        granularity: int = DEFAULT_GRANULARITY,
    ) -> Tracker:
        """Start tracking IMAGE_PATH: a new sidecar, every granule clean.

        Fails with ``FileExistsError`` if the image already has a sidecar.
        """
        image = os.fspath(image_path)
        if (
            granularity < MIN_GRANULARITY
            or granularity > MAX_GRANULARITY
            or granularity & (granularity - 1)
        ):
            raise ValueError(
                f"granularity {granularity} is not a power of two between "
                f"{MIN_GRANULARITY} and {MAX_GRANULARITY}"
            )
        fd = _open_image(image)
        try:
            _c.create(sidecar_path(image), fd, os.fstat(fd).st_size, granularity)
        finally:
            os.close(fd)
        return cls.open(image)

    @classmethod
    def open(cls, image_path: str | os.PathLike[str], *, writer: bool = False,
             image_fd: int | None = None) -> Tracker:
        """Open and validate IMAGE_PATH's sidecar.

        With ``writer=True`` this process is registered as a writer, so a
        crash before :meth:`close` leaves the sidecar marked unclean (I4);
        pass the fd the writer writes through as IMAGE_FD, so the sidecar is
        checked against that very file (one left behind by a file that was
        at this path before is refused). Check :attr:`consistent` before
        trusting the bitmap.
        """
        image = os.fspath(image_path)
        fd = _open_image(image) if image_fd is None else image_fd
        try:
            handle = _c.open_tracker(sidecar_path(image), writer, fd)
        finally:
            if image_fd is None:
                os.close(fd)
        # Consistency is not judged here: `consistent` and the change-id
        # queries check the eras when asked (a sealed sidecar's check reads
        # every era, 1 GiB at 15 TiB), so a handle opened only to read its
        # granularity or its writers stays cheap.
        return cls(handle, image)

    def close(self) -> None:
        """Release the handle; for a writer this is the clean close (I4)."""
        if self._handle is not None:
            _c.close(self._handle)
            self._handle = None

    @property
    def _h(self) -> _c.Handle:
        if self._handle is None:
            raise ValueError("tracker is closed")
        return self._handle

    # -- state --------------------------------------------------------------

    @property
    def granularity(self) -> int:
        """Bytes per tracked granule (a power of two)."""
        return self._granularity

    @property
    def generation(self) -> int:
        """The generation counter of this series: moved on by each change id
        taken and each full fetch-and-clear scan; 0 after a reset."""
        return _c.info(self._h).generation

    @property
    def series(self) -> str:
        """Hex id of the current series; a reset starts a new one."""
        return _c.info(self._h).series

    @property
    def image_size(self) -> int:
        """The image size the bitmap covers."""
        return _c.info(self._h).image_size

    @property
    def consistent(self) -> bool:
        """False when a writer died with the sidecar open, or the image grew
        untracked: the bitmap may miss writes, so treat every allocated block
        as dirty (see :meth:`reset`). Looks for dead writers first (a /proc
        sweep), so a writer killed since this handle opened is noticed (I4)."""
        _c.sweep_writers(self._h)
        # The size is checked now, not only at open: a consumer holding the
        # tracker must see growth that happened behind it. Tracked writers
        # grow the tracked size before the file, so they never trip this.
        try:
            size: int | None = os.stat(self.image_path).st_size
        except FileNotFoundError:  # moved away: only the flags can tell
            size = None
        return _consistent(self._h, size)

    def info(self) -> TrackerInfo:
        """Everything the header and control block say, for status displays.
        Reads only: ``live_writers`` and the unclean flag are as of the last
        sweep (:meth:`live_writers`, :attr:`consistent` or opening)."""
        return _c.info(self._h)

    def reset(self) -> None:
        """Accept an unclean sidecar: start a new series with every granule dirty."""
        # Cover the image as it is now: if it grew without tracking (one way
        # to be inconsistent), "every granule" must include the grown part,
        # or the reset would leave those bytes outside the bitmap for good.
        size = os.stat(self.image_path).st_size
        if size > _c.info(self._h).image_size:
            _c.resize(self._h, size)
        _c.reset(self._h)

    # -- the bitmap ---------------------------------------------------------

    def mark(self, offset: int, length: int) -> None:
        """Mark [offset, offset+length) dirty, rounded out to whole granules."""
        _c.mark(self._h, offset, length)

    def clear_range(self, offset: int, length: int) -> None:
        """Clear the dirty bits of granules wholly inside [offset,
        offset+length), just before reading that range (I2). For copiers
        that take the image in ranges, like the bulk pass."""
        _c.clear_range(self._h, offset, length)

    def mark_all(self) -> None:
        """Mark every granule of the image dirty."""
        _c.mark_all(self._h)

    def dirty_bytes(self) -> int:
        """Bytes covered by dirty granules (the last granule clipped to the image)."""
        return _c.dirty_bytes(self._h)

    def dirty_extents(self) -> list[Extent]:
        """The dirty set as merged ``(offset, length)`` extents, left dirty."""
        return pairs(_c.scan_extents(self._h, clear=False))

    def fetch_and_clear(self) -> list[Extent]:
        """Atomically take the dirty set as merged ``(offset, length)`` extents.

        Bits are cleared before their blocks are read (I2), so a write that
        lands after this call is marked again and seen by the next one.
        """
        return pairs(_c.scan_extents(self._h, clear=True))

    def fetch_and_clear_array(self) -> ExtentArray:
        """:meth:`fetch_and_clear` as a numpy structured array (offset, length)."""
        return _c.scan_extents(self._h, clear=True)

    # -- change ids (backup tools) ---------------------------------------------

    def change_id(self) -> str:
        """Take a change id: an opaque string naming this instant of the image.

        Every write marked after this call is reported by
        ``changed_extents(since=<this id>)``. Take it while the image is
        quiescent (``sync`` takes one inside its freeze) for it to name a
        point-in-time state. Any number of consumers may hold ids; none of
        them, nor a ``sync`` clearing the dirty bitmap, hides changes from
        another.
        """
        generation = _c.new_change_id(self._h)
        return str(ChangeId(self.series, generation))

    def changed_extents(self, since: str) -> list[Extent]:
        """``(offset, length)`` of everything written since change id SINCE.

        False positives are possible, misses are not. ``since="*"`` returns
        every allocated extent of the image (for a first, full copy). Raises
        ``ChangeIdInvalidError`` when the answer cannot be trusted — an id
        from another series (the sidecar was reset or recreated), from before
        an unclean shutdown (I4), malformed, or newer than this sidecar has
        handed out — and the caller must take a full copy.
        """
        if since == "*":
            return _allocated_extents(self.image_path)
        return pairs(_c.changed_since(self._h, self._validate_change_id(since)))

    def changed_extents_array(self, since: str) -> ExtentArray:
        """:meth:`changed_extents` as a numpy structured array (offset, length)."""
        return _c.changed_since(self._h, self._validate_change_id(since))

    def _validate_change_id(self, change_id: str) -> int:
        parsed = ChangeId.parse(change_id)
        info = _c.info(self._h)
        if parsed.series != info.series:
            raise ChangeIdInvalidError(
                f"change id {change_id} is from another series (the sidecar was reset or "
                "recreated since): take a full copy"
            )
        if not self.consistent:
            if _c.info(self._h).eras_damaged:
                raise ChangeIdInvalidError(
                    f"the change-id eras of {self.image_path} do not match their checksums "
                    "(the sidecar changed while the image was not tracked): no change id can "
                    "be trusted; take a full copy"
                )
            raise ChangeIdInvalidError(
                f"change tracking of {self.image_path} is unclean (a writer died, or the "
                "image was written untracked): no change id can be trusted; take a full copy"
            )
        generation = parsed.generation
        if generation >= info.generation:
            raise ChangeIdInvalidError(
                f"change id {change_id} was never handed out by this sidecar (restored from "
                "an older copy?): take a full copy"
            )
        return generation

    def resize(self, size: int) -> None:
        """Follow an image that was resized outside :class:`TrackedImage`."""
        _c.resize(self._h, size)

    # -- the copier's control block ------------------------------------------

    def freeze(self, lease_s: float) -> None:
        """Pause writers for at most LEASE_S seconds and wait for in-flight
        writes to drain. Raises ``TimeoutError`` if they don't within the lease."""
        _c.freeze(self._h, lease_s)

    def freeze_holds(self) -> bool:
        """True while this process's freeze still binds every writer."""
        try:
            _c.freeze_check(self._h)
        except OSError:
            return False
        return True

    def thaw(self) -> None:
        """Let writers continue against the source."""
        _c.thaw(self._h)

    def redirect(self, target: str | os.PathLike[str]) -> None:
        """Send frozen writers to TARGET, which must be tracked already: their
        next write lands there. Writers follow no symbolic link, so the path
        is resolved here (the copier trusts its own destination's folders).
        Raises ``FileNotFoundError`` if TARGET has no sidecar, ``OSError``
        ELOOP if it is a symbolic link; writers stay frozen then."""
        path = os.path.abspath(os.fspath(target))
        # Folder links resolved here; a link as the file itself is refused.
        real = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
        if len(os.fsencode(real)) >= _c.REDIRECT_MAX:
            raise OSError(errno.EINVAL, f"redirect target is {_c.REDIRECT_MAX} bytes or longer",
                          real)
        if os.path.islink(real):
            raise OSError(errno.ELOOP, "redirect target is a symbolic link; writers follow none",
                          real)
        with Tracker.open(real) as destination:
            _c.redirect(self._h, real, destination._h)

    def redirect_to_export(self, uri: str) -> None:
        """Send frozen writers to the NBD export URI (``nbd://`` or
        ``nbd+unix://``, no user info): a move onto an export. Their next
        write, read or flush goes there through libnbd, untracked. Raises
        OSError ETIMEDOUT if the freeze ended first (writers went on against
        the source: nothing was redirected)."""
        if len(uri.encode()) >= _c.REDIRECT_MAX:
            raise OSError(errno.EINVAL, f"redirect URI is {_c.REDIRECT_MAX} bytes or longer")
        _c.redirect_uri(self._h, uri)

    def export_to_follow(self) -> str:
        """The export URI this image was moved onto, if this process may
        follow it: only a process whose effective uid owns the image does
        (the owner is the only one who can forge the sidecar; see
        csrc/redirect.c). Raises ``SidecarUnsafeError`` otherwise, OSError
        EXDEV if the image moved to a file, ENOENT if it did not move."""
        return _c.redirect_uri_to_follow(self._h, self.path)

    def mirror_start(self, target: str | os.PathLike[str]) -> None:
        """Mirror writers' writes to clean ranges into TARGET, which must hold
        a copy of every clean range already (csrc/mirror.c, I7). The tracker
        must have been opened with its image; mirroring ends with
        ``mirror_stop``, this handle's close or this process's death."""
        path = os.path.abspath(os.fspath(target))
        # Writers follow no link, so folder links are resolved here.
        real = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
        _m.start(self._h, real)

    def mirror_stop(self) -> None:
        """Stop mirroring and wait for mirrored writes in flight to land."""
        _m.stop(self._h)

    def mirror_status(self) -> MirrorStatus:
        return _m.status(self._h)

    def copy_claim(self, offset: int, length: int) -> None:
        """Take the mirror interlock over [offset, offset+length) before its
        bytes are read from the source to copy them: mirrored writes there
        finish first, later ones leave the range dirty. Raises TimeoutError
        if one does not finish (a writer died mid-write)."""
        _m.copy_claim(self._h, offset, length)

    def copy_release(self, offset: int, length: int) -> None:
        """Release a ``copy_claim`` once the range's bytes are on the copy."""
        _m.copy_release(self._h, offset, length)

    @contextlib.contextmanager
    def copying(self, offset: int, length: int) -> Iterator[None]:
        """``copy_claim`` ... ``copy_release`` around a block of code."""
        self.copy_claim(offset, length)
        try:
            yield
        finally:
            self.copy_release(offset, length)

    def open_redirect_target(self, *, writer: bool = True) -> tuple[Tracker, int]:
        """Follow a redirect: the target's tracker (a writer's, by default)
        and an O_RDWR fd of the target image, which the caller closes.

        The target is opened in C without following any symbolic link, only
        when it belongs to the owner of this image and its sidecar records
        the move this sidecar's redirect names (raises ``SidecarUnsafeError``
        otherwise): a redirect forged into a sidecar steers no writer into
        another user's image (issue 13)."""
        handle, fd, target = _c.open_redirect_target(self._h, writer)
        return Tracker(handle, target), fd

    def redirect_target(self) -> str:
        return _c.redirect_target(self._h)

    def set_throttle(self, bytes_per_s: float) -> None:
        """Limit all writers together to BYTES_PER_S (0 lifts the limit)."""
        _c.set_throttle(self._h, int(bytes_per_s))

    def live_writers(self) -> int:
        """Writers alive now: sweeps the slots, freeing dead writers' and
        marking the sidecar unclean if one had it open (I4)."""
        return _c.sweep_writers(self._h)

    @property
    def state(self) -> str:
        return _c.state(self._h)

    # -- the writer's side (TrackedImage; one tracked C call each) -----------

    def pwrite_function(self, fd: int, path: str,
                        on_stale: StaleHandler | None = None) -> PwriteFunction:
        """A tracked ``pwrite(data, offset)`` of FD bound to this handle: one C
        call per write. ESTALE (the image was redirected) calls ON_STALE when
        given. Retire it with :func:`retire_pwrite_function` before closing."""
        return _w.pwrite_function(self._h, fd, path, on_stale)

    def discard(self, fd: int, offset: int, length: int, path: str) -> None:
        """Punch [offset, offset+length) of FD as a tracked write."""
        _w.discard(self._h, fd, offset, length, path)

    def zero(self, fd: int, offset: int, length: int, path: str, *, may_trim: bool) -> None:
        """Make [offset, offset+length) of FD read as zeros, as a tracked write:
        punched when MAY_TRIM, else zeroed in place (the blocks stay allocated
        where the filesystem can do that)."""
        _w.zero(self._h, fd, offset, length, path, may_trim=may_trim)

    def truncate(self, fd: int, size: int, path: str) -> None:
        """Truncate FD to SIZE as a tracked write."""
        _w.truncate(self._h, fd, size, path)

    @property
    def redirected(self) -> bool:
        """True once writers were sent elsewhere (one atomic load)."""
        return _c.redirected(self._h)


retire_pwrite_function = _w.retire_pwrite_function


def sidecar_users(image_path: str | os.PathLike[str]) -> list[tuple[int, int]]:
    """(pid, effective uid) of every other process that maps IMAGE's sidecar
    now: its writers, a front end, a copier. Read from /proc, so processes
    whose maps this one may not read (another user's, unless root) are
    missed."""
    try:
        st = os.stat(sidecar_path(image_path))
    except FileNotFoundError:
        return []
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        if files.process_maps(int(entry), st.st_dev, st.st_ino):
            uid = _effective_uid(int(entry))
            if uid is not None:
                found.append((int(entry), uid))
    return found


def _effective_uid(pid: int) -> int | None:
    """PID's effective uid (/proc/PID/status), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[2])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def _allocated_extents(image_path: str) -> list[Extent]:
    fd = os.open(image_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _copy.data_extent_pairs(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


__all__ = [
    "DEFAULT_GRANULARITY",
    "MAX_GRANULARITY",
    "MAX_IMAGE_SIZE",
    "MIN_GRANULARITY",
    "SIDECAR_SUFFIX",
    "MirrorStatus",
    "SidecarError",
    "Tracker",
    "TrackerInfo",
    "retire_pwrite_function",
    "sidecar_path",
]
