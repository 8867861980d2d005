"""The commit journal, ``DST.bm-commit``: what lets a killed commit be resumed.

Renaming the shadow copy into place is not the end of a sync: a copy still
needs its manifest (copy mode), writers still need their redirect and the
source its removal (move mode). A run killed in between used to leave a
destination the next run refused ("exists; use --force"). Just before the
rename, the commit writes this small journal naming the source, the mode and
the copy's inode; it is removed once the job is whole. The next run of the
same source into the same destination finds it and finishes or redoes the
job instead of refusing (see ``precheck`` and ``job``).

The journal is a trust boundary like the manifest: created 0600,
exclusively, never through a link, and ignored when someone else could
have written it.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from dataclasses import dataclass

SUFFIX = ".bm-commit"
_MAX_BYTES = 8192


def journal_path(destination: str) -> str:
    return destination + SUFFIX


@dataclass(frozen=True)
class CommitJournal:
    source: str  # absolute path of the image being copied or moved
    mode: str  # "copy" or "move"
    device: int  # st_dev and st_ino of the copy
    inode: int


def write(destination: str, source: str, mode: str, copy_fd: int) -> None:
    """Record, durably, that SOURCE is being committed to DESTINATION (whose
    shadow copy is open as COPY_FD); a stale journal is replaced."""
    st = os.fstat(copy_fd)
    body = json.dumps({"source": source, "mode": mode, "device": st.st_dev,
                       "inode": st.st_ino}).encode()
    path = journal_path(destination)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        os.write(fd, body)
        os.fsync(fd)
    finally:
        os.close(fd)


def read(destination: str) -> CommitJournal | None:
    """The journal beside DESTINATION, or None when there is none that can be
    trusted (absent, a link, written by someone else, or not a journal)."""
    try:
        fd = os.open(journal_path(destination), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if (not stat.S_ISREG(st.st_mode) or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
                or st.st_uid not in (0, os.geteuid())):
            return None
        data = os.read(fd, _MAX_BYTES)
    finally:
        os.close(fd)
    try:
        meta = json.loads(data)
        journal = CommitJournal(str(meta["source"]), str(meta["mode"]), int(meta["device"]),
                                int(meta["inode"]))
    except (ValueError, KeyError, TypeError):
        return None
    return journal if journal.mode in ("copy", "move") else None


def interrupted_commit(source: str, destination: str) -> CommitJournal | None:
    """The journal of a commit of SOURCE into DESTINATION that a killed run
    left unfinished, if DESTINATION is still the copy it names."""
    journal = read(destination)
    if journal is None or journal.source != source:
        return None
    try:
        st = os.stat(destination, follow_symlinks=False)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (journal.device, journal.inode):
        return None
    return journal


def clear(destination: str) -> None:
    """The job is whole: the journal goes."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(journal_path(destination))
