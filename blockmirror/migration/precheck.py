"""Step 0: everything checked before anything is created.

A failed check raises InvalidInputError or OutOfSpaceError with a one-line
message that names the problem, and leaves the filesystem as it was.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from blockmirror import files
from blockmirror.errors import InvalidInputError, OutOfSpaceError
from blockmirror.migration.manifest_names import MAGIC_PREFIX as MANIFEST_MAGIC_PREFIX
from blockmirror.migration.manifest_names import SUFFIX as MANIFEST_SUFFIX
from blockmirror.migration.manifest_names import TMP_SUFFIX as MANIFEST_TMP
from blockmirror.tracking.tracker import SIDECAR_SUFFIX, sidecar_bytes
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


# Names blockmirror gives its own files: never an image, never a destination.
MANIFEST_TMP_SUFFIX = MANIFEST_SUFFIX + MANIFEST_TMP
OWN_SUFFIXES = (SIDECAR_SUFFIX, MANIFEST_SUFFIX, MANIFEST_TMP_SUFFIX, PARTIAL_SUFFIX)
SIDECAR_MAGIC = b"BMCBT\r\n\032"
# In-memory bytes per allocated granule a copy-mode sync may hold at once:
# the manifest's table (index and digest), a hash resync's source digests.
MANIFEST_MEMORY_PER_GRANULE = 48


def own_file_kind(path: str) -> str | None:
    """What blockmirror file PATH is by its name ("sidecar", "manifest", "shadow
    copy"), or None for any other name."""
    name = os.path.basename(path)
    if name.endswith(SIDECAR_SUFFIX):
        return "change-tracking sidecar"
    if name.endswith((MANIFEST_SUFFIX, MANIFEST_TMP_SUFFIX)):
        return "digest manifest"
    if name.endswith(PARTIAL_SUFFIX):
        return "shadow copy of an unfinished sync"
    return None


def _own_file_kind_by_content(fd: int) -> str | None:
    head = os.pread(fd, 16, 0)
    if head.startswith(SIDECAR_MAGIC):
        return "change-tracking sidecar"
    if head.startswith(MANIFEST_MAGIC_PREFIX):
        return "digest manifest"
    return None


PSEUDO_FILESYSTEMS = frozenset({
    "proc", "sysfs", "debugfs", "tracefs", "securityfs", "cgroup", "cgroup2", "pstore",
    "bpf", "configfs", "efivarfs", "fusectl", "devpts", "mqueue", "autofs", "binfmt_misc",
    "selinuxfs", "rpc_pipefs", "nsfs", "devtmpfs",
})


def filesystem_type(path: str) -> str | None:
    """The type of the filesystem PATH is on (from /proc/self/mountinfo:
    the mount with the longest mount point above PATH), or None."""
    real = os.path.realpath(path)
    best, best_type = "", None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                fields = line.split()
                try:
                    sep = fields.index("-")
                except ValueError:
                    continue
                point = fields[4].replace("\\040", " ").replace("\\011", "\t")
                point = point.replace("\\012", "\n").replace("\\134", "\\")
                inside = real == point or real.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best) and sep + 1 < len(fields):
                    best, best_type = point, fields[sep + 1]
    except OSError:
        return None
    return best_type


def on_pseudo_filesystem(path: str) -> bool:
    """True for /proc, /sys and their kind: filesystems with no storage behind
    them, whose files lie about their size (known by type, or by path where
    /proc/self/mountinfo cannot be read)."""
    real = os.path.realpath(path)
    if real in ("/proc", "/sys") or real.startswith(("/proc/", "/sys/")):
        return True
    return filesystem_type(real) in PSEUDO_FILESYSTEMS


def manifest_bytes(allocated: int, granularity: int) -> int:
    """Disk a new manifest needs at worst (zero granules are not stored)."""
    from blockmirror.migration.manifest import stored_bytes  # late: numpy (a sync's cost)

    return stored_bytes(allocated, granularity)


def _physical_memory() -> int:
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError):
        return 1 << 62


def _source_granularity(src: str) -> int:
    """The granularity the copy's manifest will use: the source tracker's,
    or the default for an untracked source."""
    from blockmirror.tracking.tracker import DEFAULT_GRANULARITY, Tracker

    if not os.path.lexists(src + SIDECAR_SUFFIX):
        return DEFAULT_GRANULARITY
    try:
        with Tracker.open(src) as t:
            return t.granularity
    except OSError:
        return DEFAULT_GRANULARITY  # the job reports what is wrong with it


def check_destination_unused(dst: str, destination: str) -> None:
    """Refuse to replace DST while something uses it: a writer holds a slot in
    its sidecar (its writes would go to the unlinked inode), or another sync
    holds it (as its source: the sidecar's flock; as an incremental target:
    the copy's flock). Holds with --force too: --force replaces a copy, never
    a live image."""
    from blockmirror.tracking.tracker import Tracker

    sidecar = dst + SIDECAR_SUFFIX
    if os.path.lexists(sidecar):
        if os.path.islink(sidecar):
            raise InvalidInputError(
                f"destination sidecar {sidecar} is a symbolic link; remove it first")
        try:
            with Tracker.open(dst) as t:
                writers = t.live_writers()
        except OSError:
            writers = 0  # corrupt or foreign: no writer can use it either
        if writers:
            raise InvalidInputError(
                f"destination {destination} is a live image: {writers} writers have it open; "
                "stop them first (--force never replaces a live image)"
            )
        if files.is_locked(sidecar):
            raise InvalidInputError(
                f"destination {destination} is the source of a running sync")
    if os.path.lexists(dst) and files.is_locked(dst):
        raise InvalidInputError(f"another sync is writing {destination}")
    if os.path.lexists(dst):
        pids = processes_writing(dst)
        if pids:
            raise InvalidInputError(
                f"destination {destination} is open for writing by process "
                f"{', '.join(map(str, pids[:5]))}: a live image, not a copy (--force never "
                "replaces a live image); stop the writer first"
            )


def processes_writing(path: str) -> list[int]:
    """Other processes that hold PATH open for writing, from /proc/PID/fd
    and fdinfo: writers that do not use the tracker (a hypervisor opening
    the image itself) have no slot in a sidecar. Best effort: without root
    only this user's processes are visible, and other hosts (NFS) never."""
    try:
        target = os.stat(path, follow_symlinks=False)
    except OSError:
        return []
    me = os.getpid()
    name = os.path.basename(path)
    found: list[int] = []
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return []
    for pid in pids:
        if pid == me:
            continue
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                # The link's text first: stat only what could be PATH (a stat
                # of every descriptor could hang on someone's dead NFS mount).
                link = os.readlink(f"{fd_dir}/{fd}")
                if not link.startswith("/") or os.path.basename(
                    link.removesuffix(" (deleted)")
                ) != name:
                    continue
                st = os.stat(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) != (target.st_dev, target.st_ino):
                continue
            try:
                with open(f"/proc/{pid}/fdinfo/{fd}", encoding="ascii") as f:
                    flags = next((int(line.split()[1], 8) for line in f
                                  if line.startswith("flags:")), 0)
            except (OSError, ValueError):
                flags = os.O_RDWR  # cannot tell: count it
            if flags & os.O_ACCMODE != os.O_RDONLY:
                found.append(pid)
                break
    return found




def check_source(source: str, move: bool = False) -> os.stat_result:
    """SOURCE is an image a sync may read: a non-empty regular file on real
    storage, none of blockmirror's own files, within the tracker's and the
    manifest's limits. Returns its stat."""
    if source == "":
        raise InvalidInputError("source must not be empty")
    src = os.path.abspath(source)
    try:
        st = os.stat(src)
    except FileNotFoundError:
        raise InvalidInputError(f"source {source} does not exist") from None
    except PermissionError:
        raise InvalidInputError(f"source {source} cannot be read: permission denied") from None
    except OSError as e:
        raise InvalidInputError(f"source {source} cannot be used: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise InvalidInputError(
            f"source {source} is a folder; give a folder as destination too for directory mode"
        )
    if not stat.S_ISREG(st.st_mode):
        raise InvalidInputError(f"source {source} is not a regular file")
    if on_pseudo_filesystem(src):
        raise InvalidInputError(
            f"source {source} is on a pseudo filesystem (/proc, /sys): not a disk image")
    for name in (src, os.path.realpath(src)):
        kind = own_file_kind(name)
        if kind is not None:
            raise InvalidInputError(f"source {source} is a blockmirror {kind}, not an image")
    if st.st_size == 0:
        raise InvalidInputError(f"source {source} is empty (0 bytes): nothing to copy")
    try:
        fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except PermissionError:
        raise InvalidInputError(f"source {source} cannot be read: permission denied") from None
    try:
        kind = _own_file_kind_by_content(fd)
    finally:
        os.close(fd)
    if kind is not None:
        raise InvalidInputError(f"source {source} is a blockmirror {kind}, not an image")
    if os.path.islink(src + SIDECAR_SUFFIX):
        raise InvalidInputError(
            f"sidecar {src + SIDECAR_SUFFIX} is a symbolic link: refused (it could steer "
            "writers elsewhere); remove it and run blockmirror track enable")
    _check_source_limits(source, src, st, move)
    return st


def _check_source_limits(source: str, src: str, st: os.stat_result, move: bool) -> None:
    """Within what change tracking covers, and (copy mode) with a manifest
    that fits in memory."""
    from blockmirror.tracking.tracker import MAX_IMAGE_SIZE

    granularity = _source_granularity(src)
    limit = min(MAX_IMAGE_SIZE, (1 << 34) * granularity)
    if st.st_size > limit:
        raise InvalidInputError(
            f"source {source} is {format_bytes(st.st_size)}: larger than change tracking "
            f"covers ({format_bytes(limit)} at {format_bytes(granularity)} granules)")
    if not move:
        # The manifest holds digests of allocated granules only (issue 11).
        held = st.st_blocks * 512
        granules = -(-held // granularity)
        memory = _physical_memory()
        if granules * MANIFEST_MEMORY_PER_GRANULE > memory // 2:
            raise InvalidInputError(
                f"source {source} holds {format_bytes(held)}: its digest manifest "
                f"({format_bytes(granules * 16)} at {format_bytes(granularity)} granules) "
                f"would not fit in this machine's memory ({format_bytes(memory)})")


def plan_file_sync(
    source: str, destination: str, *, force: bool = False, move: bool = False
) -> Plan:
    """Check a file-mode sync of SOURCE to DESTINATION and say where it goes.

    An existing destination with a blockmirror manifest beside it is an
    earlier copy: the sync is then incremental (in place), unless FORCE asks
    for a full copy that replaces it. A destination a killed run left in
    the middle of its commit (journal.py) is resumed in the same mode."""
    st = check_source(source, move)
    src = os.path.abspath(source)
    dst = _destination_path(src, destination)
    from blockmirror.migration import journal  # late: track and verify need none of it

    interrupted = journal.interrupted_commit(src, dst) if not force else None
    resume = interrupted.mode if interrupted and interrupted.mode == ("move" if move else "copy") \
        else None
    incremental = False
    if os.path.lexists(dst):
        incremental = _existing_destination(dst, destination, force=force, move=move,
                                            resume=resume)
    elif os.path.lexists(dst + SIDECAR_SUFFIX):
        check_destination_unused(dst, destination)
    if os.path.lexists(dst + SIDECAR_SUFFIX) and not force and resume != "move":
        raise InvalidInputError(
            f"destination sidecar {dst + SIDECAR_SUFFIX} exists; use --force to replace it"
        )
    if not incremental:
        # An incremental update needs room only for what changed: ENOSPC
        # during it is handled like any other failure.
        _check_space(src, st, dst, move)
    return Plan(src, dst, partial_path(dst), st.st_size, st.st_blocks * 512, st.st_uid,
                st.st_mode, incremental, resume)


def _destination_path(src: str, destination: str) -> str:
    """The copy's final path (a folder DESTINATION keeps the source's name),
    checked: its folder exists, is writable and is a real filesystem, and the
    name is neither blockmirror's own kind of file nor the source itself."""
    if destination == "":
        raise InvalidInputError("destination must not be empty")
    dst = os.path.abspath(destination)
    if os.path.isdir(dst):
        dst = os.path.join(dst, os.path.basename(src))
    folder = os.path.dirname(dst)
    if not os.path.isdir(folder):
        raise InvalidInputError(f"destination folder {folder} does not exist")
    if on_pseudo_filesystem(folder):
        raise InvalidInputError(
            f"destination folder {folder} is on a pseudo filesystem (/proc, /sys)")
    if os.statvfs(folder).f_flag & os.ST_RDONLY:
        raise InvalidInputError(f"destination folder {folder} is on a read-only filesystem")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InvalidInputError(f"destination folder {folder} is not writable")
    kind = own_file_kind(dst)
    if kind is not None:
        raise InvalidInputError(
            f"destination {destination} is named like a blockmirror {kind}; choose another name")
    if os.path.realpath(dst) == os.path.realpath(src) or (
        os.path.lexists(dst) and os.path.exists(dst) and os.path.samefile(dst, src)
    ):
        raise InvalidInputError(f"destination {destination} is the source itself")
    return dst


def _existing_destination(dst: str, destination: str, *, force: bool, move: bool,
                          resume: str | None) -> bool:
    """DST exists: whether it is an earlier copy to update in place (True);
    refused unless it is a regular file nobody uses that --force may
    replace, or the copy of an interrupted commit being resumed."""
    dst_st = os.lstat(dst)
    if stat.S_ISDIR(dst_st.st_mode):
        raise InvalidInputError(f"destination {destination} is a folder")
    if stat.S_ISLNK(dst_st.st_mode):
        raise InvalidInputError(
            f"destination {destination} is a symbolic link; give the real path")
    if not stat.S_ISREG(dst_st.st_mode):
        raise InvalidInputError(
            f"destination {destination} is not a regular file (a device, FIFO or socket); "
            "blockmirror never replaces one, not even with --force")
    fd = os.open(dst, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        kind = _own_file_kind_by_content(fd)
    except OSError:
        kind = None
    finally:
        os.close(fd)
    if kind is not None:
        raise InvalidInputError(f"destination {destination} is a blockmirror {kind}, not a copy")
    if resume != "move":  # a finished move's copy has live writers: the job checks it
        check_destination_unused(dst, destination)
    earlier_copy = os.path.lexists(dst + MANIFEST_SUFFIX)
    if (earlier_copy or resume == "copy") and not force and not move:
        return True
    if resume != "move" and not force:  # a resumed move finishes or redoes itself
        raise InvalidInputError(f"destination {destination} exists; use --force to replace it")
    return False


def _check_space(src: str, st: os.stat_result, dst: str, move: bool) -> None:
    """Room at the destination for the source's allocated bytes, and beside
    the copy its manifest (copy mode) or its sidecar (move mode). A replaced
    destination is only removed at the end, so it frees nothing."""
    folder = os.path.dirname(dst)
    allocated = st.st_blocks * 512
    granularity = _source_granularity(src)
    if move:
        extra = sidecar_bytes(st.st_size, granularity) if os.path.lexists(
            src + SIDECAR_SUFFIX) else 0
    else:
        extra = manifest_bytes(allocated, granularity)
    need = allocated + extra
    available = free_bytes(folder) + _reusable_partial_bytes(partial_path(dst))
    if need > available:
        raise OutOfSpaceError(
            f"need {format_bytes(need)} at {folder} ({format_bytes(allocated)} of data, "
            f"{format_bytes(extra)} for the {'sidecar' if move else 'manifest'}), "
            f"{format_bytes(available)} free", folder
        )


def _reusable_partial_bytes(partial: str) -> int:
    """Space a stale shadow copy from a killed run holds (it will be removed)."""
    try:
        return os.stat(partial).st_blocks * 512
    except FileNotFoundError:
        return 0


def claim_partial(partial: str) -> int:
    """Create the shadow copy and hold an exclusive lock on it for the run
    (files.create_locked: a killed run's leftover is removed, a running
    sync's is refused)."""
    return files.create_locked(partial, lambda path: InvalidInputError(
        f"another sync is writing {path} (it holds the lock)"))
