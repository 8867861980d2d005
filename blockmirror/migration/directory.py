"""Directory mode: an image's home folder, moved or copied as a whole.

The small files beside the images (configuration, logs, descriptors) go
first, as Storage vMotion copies a VM's home; then each image is synced on
its own, with its own passes and switchover. An image is a file that has a
change-tracking sidecar, or any file of at least IMAGE_MIN_BYTES.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
import time
from collections.abc import Callable

from blockmirror import files
from blockmirror.errors import InvalidInputError, OutOfSpaceError
from blockmirror.migration.manifest import TMP_SUFFIX, manifest_path
from blockmirror.migration.options import SyncOptions
from blockmirror.migration.precheck import (
    claim_partial,
    free_bytes,
    on_pseudo_filesystem,
    own_file_kind,
    partial_path,
)
from blockmirror.migration.result import SyncResult
from blockmirror.tracking.tracker import SIDECAR_SUFFIX
from blockmirror.units import format_bytes

FileSync = Callable[[str, str, SyncOptions], SyncResult]

IMAGE_MIN_BYTES = 64 << 20


def classify(folder: str) -> tuple[list[str], list[str]]:
    """(home files, images) among FOLDER's regular files, by name."""
    home, images = [], []
    for name in sorted(os.listdir(folder)):
        if own_file_kind(name) is not None:
            continue  # sidecars, manifests, shadow copies: blockmirror's own, never copied
        st = os.lstat(os.path.join(folder, name))
        if not stat.S_ISREG(st.st_mode):
            continue  # subfolders, links and devices are not part of an image's home
        if os.path.exists(os.path.join(folder, name + SIDECAR_SUFFIX)) or (
            st.st_size >= IMAGE_MIN_BYTES
        ):
            images.append(name)
        else:
            home.append(name)
    return home, images


def sync_directory(src: str, dst: str, options: SyncOptions, *,
                   sync_file: FileSync) -> SyncResult:
    """Sync every file of folder SRC into folder DST (created if missing),
    each image with SYNC_FILE."""
    if dst == "":
        raise InvalidInputError("destination must not be empty")
    src, dst = os.path.abspath(src), os.path.abspath(dst)
    mode = options.mode
    home, images, need = _precheck(src, dst, force=options.force)
    started = time.perf_counter()
    created_folder = not os.path.isdir(dst)
    if created_folder:
        _make_folder_like(src, dst)
    created: list[str] = []
    children: list[SyncResult] = []
    try:
        for name in home:
            _copy_small_file(os.path.join(src, name), os.path.join(dst, name))
            created.append(name)
        child_options = dataclasses.replace(options, force=True)
        for name in images:
            # A sync that fails cleans up after itself (and, under --force,
            # must leave the copy it did not manage to replace); one that
            # succeeded leaves its copy, manifest and sidecar, which go if a
            # later image fails.
            children.append(sync_file(os.path.join(src, name), os.path.join(dst, name),
                                      child_options))
            created.append(name)
    except BaseException:
        _undo(dst, created, children, mode, created_folder)
        raise
    if mode == "move":
        for name in home:
            os.unlink(os.path.join(src, name))
    return _summary(src, dst, options, children, need,
                    notes=[f"{len(home)} home files, {len(images)} images"],
                    elapsed=time.perf_counter() - started)


def _precheck(src: str, dst: str, *, force: bool) -> tuple[list[str], list[str], int]:
    """Step 0 for a folder: (home files, images, bytes needed), or a one-line
    error and nothing created."""
    if os.path.lexists(dst) and not os.path.isdir(dst):
        raise InvalidInputError(f"source {src} is a folder but destination {dst} is not")
    if os.path.realpath(src) == os.path.realpath(dst):
        raise InvalidInputError(f"destination {dst} is the source folder itself")
    if not os.path.isdir(os.path.dirname(dst)):
        raise InvalidInputError(f"destination folder {os.path.dirname(dst)} does not exist")
    if on_pseudo_filesystem(src) or on_pseudo_filesystem(os.path.dirname(dst)):
        raise InvalidInputError("directory mode does not copy from or into /proc or /sys")
    home, images = classify(src)
    if not home and not images:
        raise InvalidInputError(f"source folder {src} has no files to copy")
    if os.path.isdir(dst) and not force:
        clash = [n for n in home + images if os.path.lexists(os.path.join(dst, n))]
        if clash:
            raise InvalidInputError(
                f"destination {os.path.join(dst, clash[0])} exists; use --force to replace it"
            )
    need = sum(os.stat(os.path.join(src, n)).st_blocks * 512 for n in home + images)
    check_folder = dst if os.path.isdir(dst) else os.path.dirname(dst)
    if need > free_bytes(check_folder):
        raise OutOfSpaceError(
            f"need {format_bytes(need)} at {check_folder}, "
            f"{format_bytes(free_bytes(check_folder))} free", check_folder,
        )

    return home, images, need


def _summary(src: str, dst: str, options: SyncOptions, children: list[SyncResult], need: int,
             *, notes: list[str], elapsed: float) -> SyncResult:
    """The folder's result: one per image in ``children``, totals on top."""
    result = SyncResult(
        status="ok", source=src, destination=dst, mode=options.mode,
        tracked=any(c.tracked for c in children),
        image_size=sum(c.image_size for c in children),
        allocated_bytes=need, target_downtime=options.target_downtime,
        bytes_copied=sum(c.bytes_copied for c in children),
        bytes_written=sum(c.bytes_written for c in children),
        downtime=max((c.downtime for c in children), default=0.0),
        elapsed=elapsed,
        verified=bool(children) and all(c.verified for c in children),
        notes=notes,
    )
    result.children = children
    return result


def _undo(dst: str, created: list[str], children: list[SyncResult], mode: str,
          created_folder: bool) -> None:
    """Remove what this run made in DST - each file, and beside each image
    its sidecar, its manifest (and an unpublished one) and its shadow copy
    - then the folder if this run made it. Images already moved stay: their
    writers now write the destination, so it is the live copy."""
    moved = {c.destination for c in children} if mode == "move" else set()
    for name in created:
        path = os.path.join(dst, name)
        if path in moved:
            continue
        for made in (path, path + SIDECAR_SUFFIX, manifest_path(path),
                     manifest_path(path) + TMP_SUFFIX, partial_path(path)):
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                os.unlink(made)
    if created_folder and not moved:
        with contextlib.suppress(OSError):
            os.rmdir(dst)


def _make_folder_like(src: str, dst: str) -> None:
    """Create DST (exclusively: mkdir fails on anything already there, link
    or not) with SRC's permission bits, set through a descriptor."""
    os.mkdir(dst, 0o700)
    fd = os.open(dst, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchmod(fd, stat.S_IMODE(os.stat(src).st_mode))
    finally:
        os.close(fd)


def _copy_small_file(src: str, dst: str) -> None:
    """Copy under a temporary name, fsync, then rename: never a half file.

    The destination folder may be writable by others, so nothing is opened
    by a name they could have planted: the temporary file is created
    exclusively without following links (a planted ``.NAME.bm-partial``
    symlink is removed as a name, never written through), the content, mode,
    owner and times go through descriptors, and the rename is checked to
    have published our file. The source is opened without following links
    too (a home file swapped for a link would copy another file's content).
    Extended attributes and ACLs are not copied."""
    src_fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        st = os.fstat(src_fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidInputError(f"{src} is no longer a regular file")
        tmp = partial_path(dst)
        fd = claim_partial(tmp)
        try:
            _copy_fd(src_fd, fd, st.st_size)
            if os.geteuid() == 0:
                os.fchown(fd, st.st_uid, st.st_gid)
            os.fchmod(fd, stat.S_IMODE(st.st_mode))
            os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
            os.fsync(fd)
            if not files.same_file(fd, tmp):
                raise InvalidInputError(
                    f"{tmp} was replaced while it was written: someone else writes "
                    f"{os.path.dirname(dst)}")
            os.replace(tmp, dst)
            if not files.same_file(fd, dst):
                raise InvalidInputError(
                    f"{dst} was replaced as it was published: someone else writes "
                    f"{os.path.dirname(dst)}")
        except BaseException:
            with contextlib.suppress(OSError):
                if files.same_file(fd, tmp):
                    os.unlink(tmp)
            raise
        finally:
            os.close(fd)
    finally:
        os.close(src_fd)




def _copy_fd(src_fd: int, dst_fd: int, size: int) -> None:
    """SIZE bytes of SRC_FD into the empty DST_FD, by offsets."""
    offset = 0
    while offset < size:
        try:
            n = os.copy_file_range(src_fd, dst_fd, size - offset, offset, offset)
        except OSError:
            n = -1
        if n < 0:  # not supported here (EXDEV, EOPNOTSUPP, ...): read and write
            chunk = os.pread(src_fd, min(1 << 20, size - offset), offset)
            if not chunk:
                break
            view = memoryview(chunk)
            while view:
                w = os.pwrite(dst_fd, view, offset)
                view, offset = view[w:], offset + w
            continue
        if n == 0:
            break  # the file shrank meanwhile
        offset += n
