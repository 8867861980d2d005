"""converge="mirror": once the first pass has copied everything, writers'
writes to clean ranges go to the copy as well as the source (csrc/mirror.c),
so the dirty set shrinks however fast they write, and the dirty passes only
take what writers wrote where a copier was reading (or before the mirror).

A :class:`MirrorSession` is the job's handle on that: it starts the mirror,
gives the copier the interlock to hold around each work item (invariant
I7), says when the destination failed a mirrored write, and at the end
names every range a mirrored write may have changed, for the manifest. It
decides nothing about convergence; the job does.
"""

from __future__ import annotations

import errno
import os

from blockmirror.errors import OutOfSpaceError
from blockmirror.extents import Extent, ExtentArray, pairs
from blockmirror.tracking.tracker import MirrorStatus, Tracker


class MirrorFailedError(OSError):
    """The destination refused a mirrored write (writers were not failed)."""


class MirrorSession:
    """Mirroring TRACKER's image into TARGET for the rest of one sync."""

    def __init__(self, tracker: Tracker, target: str) -> None:
        self.tracker = tracker
        self.target = target
        # Mirrored writes set no dirty bit, but they do raise eras: what was
        # written since this change id is what they may have changed.
        self.since = tracker.change_id()
        tracker.mirror_start(target)
        self.active = True

    def claim(self, item: ExtentArray) -> None:
        """Before a work item is read: claim all of its extents, or none."""
        taken: list[Extent] = []
        try:
            for offset, length in pairs(item):
                self.tracker.copy_claim(offset, length)
                taken.append((offset, length))
        except BaseException:
            for offset, length in taken:
                self.tracker.copy_release(offset, length)
            raise

    def release(self, item: ExtentArray) -> None:
        """After the item's bytes are on the destination."""
        for offset, length in pairs(item):
            self.tracker.copy_release(offset, length)

    def status(self) -> MirrorStatus:
        return self.tracker.mirror_status()

    def check(self) -> None:
        """Raise if the destination failed a mirrored write: the writes it
        refused are dirty, but a copy that cannot take writes will not take
        the passes either."""
        status = self.status()
        if status.state != "failed":
            return
        why = os.strerror(status.error) if status.error else "unknown error"
        message = f"the destination failed a mirrored write ({why}); writers were not affected"
        if status.error == errno.ENOSPC:
            raise OutOfSpaceError(message, self.target)
        raise MirrorFailedError(status.error or errno.EIO, message, self.target)

    def stop(self) -> MirrorStatus:
        """Stop mirroring (waiting for mirrored writes in flight); the final
        status. Call with writers frozen, before the copy is final."""
        if self.active:
            self.tracker.mirror_stop()
            self.active = False
        return self.status()

    def changed(self) -> list[Extent]:
        """Every range written since the mirror started, mirrored or not."""
        return self.tracker.changed_extents(self.since)
