"""Files blockmirror creates and checks by name, safely: one home for the
rules every such file follows (I5, I6).

A file blockmirror makes (a shadow copy, a new manifest, a home file being
copied) is created exclusively, never through a symbolic link, mode 0600,
and held under an ``flock`` for as long as the run owns it. A leftover of a
killed run is unlocked, so it is removed - by name, only while the name still
holds that file, and a planted link is removed as a name, never followed -
and the creation retried; a locked one belongs to a run still going.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Callable

Busy = Callable[[str], Exception]
"""Builds the error for a PATH another running sync holds."""

_CREATE = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_PROBE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
# What opening a planted name can answer: a symlink (ELOOP), a socket or
# FIFO without a peer (ENXIO), a file we may not read (EACCES).
_NOT_OURS = (errno.ELOOP, errno.ENXIO, errno.EACCES)


def same_file(fd: int, path: str) -> bool:
    """True when PATH (not followed) names the file open at FD."""
    try:
        named = os.lstat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def create_locked(path: str, busy: Busy) -> int:
    """Create PATH exclusively (0600, not through a link), flock it and
    return the fd. A stale leftover is removed first (see the module); one
    another run holds raises ``busy(path)``."""
    for _ in range(8):
        try:
            fd = os.open(path, _CREATE, 0o600)
        except FileExistsError:
            remove_stale(path, busy)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # lost a race with another run creating it
            os.close(fd)
            raise busy(path) from None
        return fd
    raise busy(f"{path} (it keeps reappearing; is someone else writing this folder?)")


def remove_stale(path: str, busy: Busy) -> None:
    """Remove the leftover at PATH unless a running sync holds it."""
    try:
        fd = os.open(path, _PROBE)
    except FileNotFoundError:
        return
    except OSError as e:
        if e.errno not in _NOT_OURS:
            raise
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # removing a name never touches what a link points at
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise busy(path) from None
        if same_file(fd, path):
            os.unlink(path)  # else it was swapped meanwhile: the retry sees it again
    finally:
        os.close(fd)


def is_locked(path: str) -> bool:
    """True when another process holds an flock on PATH (not followed)."""
    try:
        fd = os.open(path, _PROBE)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # also drops the lock if we got it
    return False


def pread_full(fd: int, length: int, offset: int) -> bytes:
    """Up to LENGTH bytes at OFFSET, short only at the end of the file."""
    parts = []
    while length > 0:
        chunk = os.pread(fd, length, offset)
        if not chunk:
            break
        parts.append(chunk)
        length -= len(chunk)
        offset += len(chunk)
    return b"".join(parts)


def fsync_folder(folder: str) -> None:
    """Make the names in FOLDER durable (a rename is on disk only once its
    folder is)."""
    fd = os.open(folder or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def process_maps(pid: int, dev: int, ino: int) -> bool | None:
    """Whether process PID has the file (DEV, INO) mapped; None if gone."""
    wanted = f"{os.major(dev):02x}:{os.minor(dev):02x} {ino} "
    try:
        with open(f"/proc/{pid}/maps") as f:
            return any(wanted in line for line in f)
    except (FileNotFoundError, ProcessLookupError):
        return None
    except PermissionError:  # not ours to read: we cannot vouch for it
        return False
