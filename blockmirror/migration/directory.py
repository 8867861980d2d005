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
import shutil
import stat
import time
from collections.abc import Callable

from blockmirror.errors import InvalidInputError, OutOfSpaceError
from blockmirror.migration.options import SyncOptions
from blockmirror.migration.precheck import PARTIAL_SUFFIX, free_bytes
from blockmirror.migration.result import SyncResult
from blockmirror.tracking.tracker import SIDECAR_SUFFIX
from blockmirror.units import format_bytes

FileSync = Callable[[str, str, SyncOptions], SyncResult]

IMAGE_MIN_BYTES = 64 << 20


def classify(folder: str) -> tuple[list[str], list[str]]:
    """(home files, images) among FOLDER's regular files, by name."""
    home, images = [], []
    for name in sorted(os.listdir(folder)):
        if name.endswith((SIDECAR_SUFFIX, PARTIAL_SUFFIX)):
            continue
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
    src, dst = os.path.abspath(src), os.path.abspath(dst)
    force = options.force
    mode = options.mode
    if os.path.lexists(dst) and not os.path.isdir(dst):
        raise InvalidInputError(f"source {src} is a folder but destination {dst} is not")
    if os.path.realpath(src) == os.path.realpath(dst):
        raise InvalidInputError(f"destination {dst} is the source folder itself")
    if not os.path.isdir(os.path.dirname(dst)):
        raise InvalidInputError(f"destination folder {os.path.dirname(dst)} does not exist")
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

    started = time.perf_counter()
    created_folder = not os.path.isdir(dst)
    if created_folder:
        os.mkdir(dst, 0o700)
        shutil.copymode(src, dst)
    created: list[str] = []
    children: list[SyncResult] = []
    try:
        for name in home:
            _copy_small_file(os.path.join(src, name), os.path.join(dst, name))
            created.append(name)
        child_options = dataclasses.replace(options, force=True)
        for name in images:
            children.append(sync_file(os.path.join(src, name), os.path.join(dst, name),
                                      child_options))
            created.append(name)
    except BaseException:
        # Undo what this run made, except images already moved: their
        # writers now write the destination, so it is the live copy.
        moved = {c.destination for c in children} if mode == "move" else set()
        for name in created:
            path = os.path.join(dst, name)
            if path not in moved:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path + SIDECAR_SUFFIX)
        if created_folder and not moved:
            with contextlib.suppress(OSError):
                os.rmdir(dst)
        raise
    if mode == "move":
        for name in home:
            os.unlink(os.path.join(src, name))
    result = SyncResult(
        status="ok", source=src, destination=dst, mode=mode,
        tracked=any(c.tracked for c in children),
        image_size=sum(c.image_size for c in children),
        allocated_bytes=need, target_downtime=options.target_downtime,
        bytes_copied=sum(c.bytes_copied for c in children),
        bytes_written=sum(c.bytes_written for c in children),
        downtime=max((c.downtime for c in children), default=0.0),
        elapsed=time.perf_counter() - started,
        verified=bool(children) and all(c.verified for c in children),
        notes=[f"{len(home)} home files, {len(images)} images"],
    )
    result.children = children
    return result


def _copy_small_file(src: str, dst: str) -> None:
    """Copy under a temporary name, fsync, then rename: never a half file."""
    tmp = os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}{PARTIAL_SUFFIX}")
    try:
        shutil.copy2(src, tmp)
        fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
