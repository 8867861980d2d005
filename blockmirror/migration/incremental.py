"""Incremental sync: updating an earlier blockmirror copy in place.

The earlier copy's manifest says which change id of the source it is exact
at. What the first pass must copy is what changed since that id; when the id
cannot be trusted (a writer crashed, the sidecar was reset, an earlier update
died midway) it is every granule whose digest differs from the manifest
(hash resync). The manifest says "updating" before the first byte changes.
"""

from __future__ import annotations

import fcntl
import os

from blockmirror.copying.copier import data_extents
from blockmirror.errors import ChangeIdInvalidError, InvalidInputError
from blockmirror.extents import Extents, pairs, union
from blockmirror.migration.manifest import (
    STATE_CLEAN,
    STATE_UNTRUSTED,
    Manifest,
    ManifestError,
    OldManifestError,
    differing_extents,
    manifest_path,
)
from blockmirror.tracking.tracker import DEFAULT_GRANULARITY, Tracker


def open_earlier_copy(destination: str, *, notes: list[str], rebuild: bool = False,
                      source: str = "",
                      granularity: int = DEFAULT_GRANULARITY) -> tuple[Manifest, int]:
    """The earlier copy's manifest and a read-write fd on the copy, locked
    against other syncs for as long as the fd is open. With REBUILD (a commit
    killed before the copy's manifest was published) a missing manifest is
    rebuilt by hashing the copy itself: its digests then describe exactly
    what the copy holds, and the first pass is a hash resync.

    Before anything changes, the copy is checked against what its manifest
    was bound to (issue 13, item 6): an edited, truncated, restored or
    swapped copy makes the manifest untrusted, and the first pass then
    re-copies the source's whole range in place (the reason goes to NOTES)."""
    fd = os.open(destination, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InvalidInputError(f"another sync is writing {destination}") from None
        path = manifest_path(destination)
        if rebuild and not os.path.lexists(path):
            return _rebuilt_manifest(fd, path, granularity, source), fd
        try:
            manifest = Manifest.open(path)
        except OldManifestError as e:
            # Its digests are not read any more; the copy's own bytes say
            # what it holds, and a hash resync makes it the source.
            notes.append(f"{e}: rebuilt by hashing the copy's data")
            return _rebuilt_manifest(fd, path, granularity, source), fd
        except ManifestError as e:
            raise InvalidInputError(f"{e}; use --force for a full copy") from None
        reason = manifest.check_copy(fd)
        if reason is not None:
            notes.append(f"full resync in place: {reason}")
        return manifest, fd
    except BaseException:
        os.close(fd)
        raise


def _rebuilt_manifest(fd: int, path: str, granularity: int, source: str) -> Manifest:
    size = os.fstat(fd).st_size
    manifest = Manifest.create(path, granularity=granularity, image_size=size, source=source)
    manifest.record(fd, pairs(data_extents(fd, size)))
    return manifest


def changed_extents(tracker: Tracker | None, manifest: Manifest,
                    notes: list[str]) -> Extents | None:
    """What changed since the copy's change id, or None when only a hash
    resync can tell (the reason goes into NOTES)."""
    if tracker is not None and manifest.state == STATE_CLEAN and manifest.series:
        try:
            extents = tracker.changed_extents_array(manifest.change_id)
        except ChangeIdInvalidError as e:
            notes.append(f"hash resync: {e}")
            return None
        notes.append(f"incremental since change id {manifest.change_id}")
        return extents
    if manifest.state == STATE_UNTRUSTED:
        pass  # the reason was noted when the copy was checked
    elif manifest.state != STATE_CLEAN:
        notes.append("hash resync: the earlier update of the copy did not finish")
    else:
        notes.append("hash resync: the copy has no change id to start from")
    return None


def first_pass_extents(tracker: Tracker | None, manifest: Manifest, src_fd: int, copy_fd: int,
                       *, workers: int, notes: list[str]) -> Extents:
    """Prepare the copy for its update and say what the first pass copies.

    Decides between change id and hash resync, says "updating" durably,
    follows the source's size, and adds every granule the manifest knows
    nothing about (a crash mid-update leaves such granules)."""
    extents = changed_extents(tracker, manifest, notes)
    size = os.fstat(src_fd).st_size
    manifest.begin_update()
    if size != manifest.image_size:
        manifest.resize(size)
    if os.fstat(copy_fd).st_size != size:
        os.ftruncate(copy_fd, size)
    if extents is None and manifest.state == STATE_UNTRUSTED:
        # Every digest unknown: re-copy wherever the source or the copy has
        # data (the copy may hold bytes where the source has holes); where
        # both have holes both read as zeros already.
        everything = _granule_aligned(union(pairs(data_extents(src_fd, size)),
                                            pairs(data_extents(copy_fd, size))),
                                      manifest.granularity, size)
        manifest.assume_zero_outside(everything)
        return everything
    if extents is None:
        return differing_extents(manifest, src_fd, size, workers=workers)
    return union(pairs(extents), manifest.unknown_extents())


def _granule_aligned(extents: list[tuple[int, int]], granularity: int,
                     size: int) -> list[tuple[int, int]]:
    """EXTENTS rounded out to whole granules (clipped to SIZE), merged."""
    rounded = ((offset // granularity * granularity,
                min(size, -(-(offset + length) // granularity) * granularity))
               for offset, length in extents)
    return union((start, end - start) for start, end in rounded if end > start)
