"""The durable commit: what makes a finished copy survive a crash and take
its final name, and what a move does to the source afterwards.

Order matters, and each step is here once:

    copy data fsynced -> mode and owner set -> stale sidecar/manifest of a
    replaced copy removed -> rename into place -> folder fsynced

A crash before the rename leaves only the hidden shadow copy (the next run
removes it); after the folder fsync the copy is there with its final name.
"""

from __future__ import annotations

import contextlib
import os

from blockmirror import files
from blockmirror.migration import journal
from blockmirror.migration.manifest import manifest_path
from blockmirror.migration.precheck import Plan
from blockmirror.tracking.tracker import sidecar_path


def publish_shadow(plan: Plan, shadow_fd: int, mode: str) -> None:
    """Give the shadow copy the source's mode and owner, make it durable and
    rename it to its final name (replacing an older copy under --force). The
    commit journal (journal.py) says, until the job clears it, that a copy
    or move (MODE) of this source is being committed there."""
    os.fchmod(shadow_fd, plan.mode & 0o7777)
    if os.geteuid() == 0:
        os.fchown(shadow_fd, plan.owner_uid, -1)
    os.fsync(shadow_fd)
    dst = plan.destination
    for stale in (sidecar_path(dst), manifest_path(dst)):
        # --force: the replaced copy's sidecar and manifest must go before
        # the new copy takes the name, or they would describe it wrongly.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(stale)
    journal.write(dst, plan.source, mode, shadow_fd)
    os.rename(plan.partial, dst)
    files.fsync_folder(os.path.dirname(dst))


def unpublish(plan: Plan) -> None:
    """Undo :func:`publish_shadow` and what followed it on a failure before
    the switch: the copy, a sidecar made for it (move) and its manifest."""
    dst = plan.destination
    for path in (dst, sidecar_path(dst), manifest_path(dst), journal.journal_path(dst)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def remove_source(plan: Plan) -> None:
    """Move mode, after the switch: the source and its sidecar go. Writers
    still holding them were redirected; their mapping of the sidecar keeps
    answering ESTALE, so no write lands in the removed file."""
    os.unlink(plan.source)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sidecar_path(plan.source))
    files.fsync_folder(os.path.dirname(plan.source))
