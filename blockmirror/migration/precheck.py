"""Step 0: everything checked before anything is created.

A failed check raises InvalidInputError or OutOfSpaceError with a one-line
message that names the problem, and leaves the filesystem as it was.
"""

from __future__ import annotations

import fcntl
import os
import stat
from dataclasses import dataclass

from blockmirror.errors import InvalidInputError, OutOfSpaceError
from blockmirror.migration import journal
from blockmirror.migration.manifest import SUFFIX as MANIFEST_SUFFIX
from blockmirror.tracking.tracker import SIDECAR_SUFFIX
from blockmirror.units import format_bytes

PARTIAL_SUFFIX = ".bm-partial"


@dataclass(frozen=True)
class Plan:
    """Where a file-mode sync reads and writes."""

    source: str
    destination: str  # the final name
    partial: str  # the shadow copy's name until switchover
    size: int
    allocated: int
    owner_uid: int
    mode: int
    incremental: bool = False  # DST is an earlier blockmirror copy: update it in place
    resume: str | None = None  # the mode of a commit into DST a killed run left unfinished


def partial_path(destination: str) -> str:
    """The shadow copy's name: hidden, beside the final name, fixed so that a
    later run finds what a killed run left."""
    folder, name = os.path.split(destination)
    return os.path.join(folder, f".{name}{PARTIAL_SUFFIX}")


def free_bytes(folder: str) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def plan_file_sync(
    source: str, destination: str, *, force: bool = False, move: bool = False
) -> Plan:
    """Check a file-mode sync of SOURCE to DESTINATION and say where it goes.

    An existing destination with a blockmirror manifest beside it is an
    earlier copy: the sync is then incremental (in place), unless FORCE asks
    for a full copy that replaces it."""
    src = os.path.abspath(source)
    try:
        st = os.stat(src)
    except FileNotFoundError:
        raise InvalidInputError(f"source {source} does not exist") from None
    except PermissionError:
        raise InvalidInputError(f"source {source} cannot be read: permission denied") from None
    if stat.S_ISDIR(st.st_mode):
        raise InvalidInputError(
            f"source {source} is a folder; give a folder as destination too for directory mode"
        )
    if not stat.S_ISREG(st.st_mode):
        raise InvalidInputError(f"source {source} is not a regular file")
    if st.st_size == 0:
        raise InvalidInputError(f"source {source} is empty (0 bytes): nothing to copy")
    if src.endswith(SIDECAR_SUFFIX):
        raise InvalidInputError(f"source {source} is a change-tracking sidecar, not an image")
    try:
        with open(src, "rb") as f:
            f.read(1)
    except PermissionError:
        raise InvalidInputError(f"source {source} cannot be read: permission denied") from None

    dst = os.path.abspath(destination)
    if os.path.isdir(dst):
        dst = os.path.join(dst, os.path.basename(src))
    folder = os.path.dirname(dst)
    if not os.path.isdir(folder):
        raise InvalidInputError(f"destination folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InvalidInputError(f"destination folder {folder} is not writable")
    if os.path.realpath(dst) == os.path.realpath(src) or (
        os.path.lexists(dst) and os.path.exists(dst) and os.path.samefile(dst, src)
    ):
        raise InvalidInputError(f"destination {destination} is the source itself")
    incremental = False
    interrupted = journal.interrupted_commit(src, dst) if not force else None
    resume = interrupted.mode if interrupted and interrupted.mode == ("move" if move else "copy") \
        else None
    if os.path.lexists(dst):
        if os.path.isdir(dst):
            raise InvalidInputError(f"destination {destination} is a folder")
        earlier_copy = os.path.isfile(dst) and os.path.exists(dst + MANIFEST_SUFFIX)
        if (earlier_copy or resume == "copy") and not force and not move:
            incremental = True
        elif resume == "move":
            pass  # the job finishes or redoes the interrupted move
        elif not force:
            raise InvalidInputError(
                f"destination {destination} exists; use --force to replace it"
            )
    if os.path.lexists(dst + SIDECAR_SUFFIX) and not force and resume != "move":
        raise InvalidInputError(
            f"destination sidecar {dst + SIDECAR_SUFFIX} exists; use --force to replace it"
        )

    allocated = st.st_blocks * 512
    # A replaced destination is only removed at the end, so it frees nothing.
    # An incremental update needs room only for what changed: ENOSPC during
    # it is handled like any other failure.
    available = free_bytes(folder) + _reusable_partial_bytes(partial_path(dst))
    if allocated > available and not incremental:
        raise OutOfSpaceError(
            f"need {format_bytes(allocated)} at {folder}, {format_bytes(available)} free", folder
        )
    return Plan(src, dst, partial_path(dst), st.st_size, allocated, st.st_uid, st.st_mode,
                incremental, resume)


def _reusable_partial_bytes(partial: str) -> int:
    """Space a stale shadow copy from a killed run holds (it will be removed)."""
    try:
        return os.stat(partial).st_blocks * 512
    except FileNotFoundError:
        return 0


def claim_partial(partial: str) -> int:
    """Create the shadow copy and hold an exclusive lock on it for the run.

    A shadow copy left by a killed run is unlocked: remove it and start over.
    One that is locked belongs to a sync that is still running.
    """
    while True:
        try:
            fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600)
        except FileExistsError:
            _remove_stale_partial(partial)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            # Lost a race with another run creating the same name.
            os.close(fd)
            raise InvalidInputError(f"another sync is writing {partial}") from None
        return fd


def _remove_stale_partial(partial: str) -> None:
    try:
        fd = os.open(partial, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InvalidInputError(
                f"another sync is running into {partial} (it holds the lock)"
            ) from None
        os.unlink(partial)
    finally:
        os.close(fd)
