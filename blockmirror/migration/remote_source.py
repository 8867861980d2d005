"""An NBD export, or a file on an NFS server, as the source of a sync: a
one-shot copy into a local file.

``blockmirror sync nbd://HOST/EXPORT DST`` copies the export the way a
local bulk pass does: block status (base:allocation) says where the export
reads as zeros and those ranges are never read; the rest is read with many
requests in flight on every connection the server allows (multi-conn) and
only its data blocks are written, into a hidden shadow file beside DST,
which is fsynced and renamed into place only when the whole copy is there.
Any failure removes the shadow; nothing is ever written to the export.

There is no tracker on the far side: writes that reach the export while it
is read are not seen, so the copy is exact only if the export is quiescent
(or read-only) for the whole copy. A careful operator wants that said before
the copy, not after a torn image has been restored: a writable export is
refused (exit 2) unless ``--quiesced`` gives the caller's word that its
writers are stopped. A read-only export needs no flag (nothing can write
through it; another writer of the file behind the server still could), and
every result says what the copy's exactness rests on. ``--verify`` asks
block status again, reads the export again where it held or holds data and
compares that with the shadow before the rename, which catches most writes
during the copy.

``blockmirror sync nfs://SERVER/EXPORT/FILE DST`` is the same copy from a
file on an NFS server (NFSv3, libnfs): several READ3 calls in flight on each
connection, only non-zero blocks written, through the same shadow. NFSv3
cannot say where a file's holes are, so every byte is read (the server's
own count of allocated bytes bounds the space check). Anyone who can mount
the export may write the file, so ``--quiesced`` is always required.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from blockmirror import files
from blockmirror.copying.endpoint import NbdUri, NfsUrl, looks_like_uri, parse
from blockmirror.copying.remote import ExportReader, NbdExport
from blockmirror.errors import InvalidInputError, OutOfSpaceError, VerifyError
from blockmirror.extents import Extent, ExtentArray, pairs, total_bytes, union
from blockmirror.migration.manifest import manifest_path
from blockmirror.migration.options import SyncOptions
from blockmirror.migration.policy import PassRecord
from blockmirror.migration.precheck import (
    check_destination_unused,
    claim_partial,
    free_bytes,
    on_pseudo_filesystem,
    own_file_kind,
    partial_path,
)
from blockmirror.migration.result import SyncProgress, SyncResult
from blockmirror.tracking.tracker import sidecar_path
from blockmirror.units import format_bytes

if TYPE_CHECKING:
    from blockmirror.copying.connections import ConnectionCopier
    from blockmirror.copying.copier import CopyStats
    from blockmirror.copying.nfs import NfsFile

UNTRACKED_NOTE = ("the source is an NBD export, whose writers blockmirror cannot track: the "
                  "copy is exact only if nothing wrote the export during the copy")
NFS_NOTE = ("the source is a file on an NFS server, whose writers blockmirror cannot track: "
            "the copy is exact only if nothing wrote it during the copy; --quiesced: the "
            "caller said nothing writes it")


def sync_from_export(src: str, dst: str, options: SyncOptions) -> SyncResult:
    """Copy the export SRC into the local file DST: checked first (one line,
    exit 2, nothing created), then copied through a shadow file."""
    uri = parse(src)
    if isinstance(uri, NfsUrl):
        return _sync_from_nfs(uri, dst, options)
    assert isinstance(uri, NbdUri)
    _refuse_unsupported(uri, dst, options)
    export = NbdExport(uri, connections=options.workers, write=False)
    try:
        note = _exactness_note(export, options)  # first: the refusal that matters most
        destination = _destination(dst, force=options.force)
        extents = export.data_extents()
        _check_space(destination, total_bytes(extents))
        return _ExportCopy(export, destination, options, extents, note).run()
    finally:
        export.close()


def _sync_from_nfs(url: NfsUrl, dst: str, options: SyncOptions) -> SyncResult:
    """Copy the NFS file URL into the local file DST: checked first (one
    line, exit 2, nothing created), then copied through a shadow file."""
    from blockmirror.copying.nfs import NfsFile

    _refuse_unsupported(url, dst, options)
    if not options.quiesced:
        raise InvalidInputError(
            f"NFS file {url} can be written by anyone who mounts its export, and those "
            "writers are not tracked: as the source of sync it would give a torn copy if "
            "anything writes it meanwhile; stop its writers and pass --quiesced")
    destination = _destination(dst, force=options.force)
    nfs_file = NfsFile(url, connections=options.workers)
    try:
        nfs_file.open_existing()
        _check_space(destination, min(nfs_file.size, nfs_file.allocated_bytes()))
        return _NfsFileCopy(nfs_file, destination, options, nfs_file.data_extents(),
                            NFS_NOTE).run()
    finally:
        nfs_file.close()


def _refuse_unsupported(uri: NbdUri | NfsUrl, dst: str, options: SyncOptions) -> None:
    kind, tool = (("an NFS file", "nfs-cp") if isinstance(uri, NfsUrl)
                  else ("an NBD export", "nbdcopy"))
    if looks_like_uri(dst):
        raise InvalidInputError(f"from {kind} to a remote destination ({uri} -> ...) is not "
                                f"supported: use {tool}")
    if options.move:
        raise InvalidInputError(f"--move from {kind} is not supported ({uri}): its "
                                "writers cannot be redirected; copy instead")
    if options.converge != "fail" or options.defer_hot:
        raise InvalidInputError(f"--converge and --defer-hot need a tracked local source; "
                                f"{kind} ({uri}) is copied once, with no passes")


def _exactness_note(export: NbdExport, options: SyncOptions) -> str:
    """What the copy's exactness rests on; refuses a writable export whose
    writers the caller has not said are stopped."""
    if not export.writable:
        return (f"{UNTRACKED_NOTE}; the export is read-only (another writer of the file "
                "behind the server would still not be seen)")
    if not options.quiesced:
        raise InvalidInputError(
            f"NBD export {export.name} is writable and its writers are not tracked: as the "
            "source of sync it would give a torn copy if anything writes it meanwhile; stop "
            "its writers and pass --quiesced, or serve it read-only")
    return f"{UNTRACKED_NOTE}; --quiesced: the caller said nothing writes it"


def _destination(text: str, *, force: bool) -> str:
    """The copy's absolute path, checked: a file name in a writable folder on
    real storage, not one of blockmirror's own files; an existing regular
    file only with FORCE and when nobody has it open for writing."""
    if text == "":
        raise InvalidInputError("destination must not be empty")
    dst = os.path.abspath(text)
    if os.path.isdir(dst):
        raise InvalidInputError(f"destination {text} is a folder: give the copy's file name "
                                "(an export has no name to keep)")
    folder = os.path.dirname(dst)
    if not os.path.isdir(folder):
        raise InvalidInputError(f"destination folder {folder} does not exist")
    if on_pseudo_filesystem(folder) or os.statvfs(folder).f_flag & os.ST_RDONLY:
        raise InvalidInputError(f"destination folder {folder} is read-only or not storage")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InvalidInputError(f"destination folder {folder} is not writable")
    kind = own_file_kind(dst)
    if kind is not None:
        raise InvalidInputError(f"destination {text} is named like a blockmirror {kind}")
    if os.path.lexists(dst):
        st = os.lstat(dst)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidInputError(f"destination {text} is not a regular file; never replaced")
        if not force:
            raise InvalidInputError(f"destination {text} exists; use --force to replace it")
        check_destination_unused(dst, text)
    return dst


def _check_space(destination: str, data_bytes: int) -> None:
    folder = os.path.dirname(destination)
    partial = partial_path(destination)
    reusable = os.stat(partial).st_blocks * 512 if os.path.exists(partial) else 0
    available = free_bytes(folder) + reusable
    if data_bytes > available:
        raise OutOfSpaceError(f"need up to {format_bytes(data_bytes)} at {folder} for the "
                              f"export's data, {format_bytes(available)} free", folder)


VERIFY_CHUNK = 4 << 20


def _differing_chunks(path: str, export: NbdExport | NfsFile,
                      ranges: list[Extent]) -> list[Extent]:
    """The VERIFY_CHUNK pieces of RANGES where the file PATH and the export
    differ, one reader per connection of the export."""
    pieces = [(pos, min(VERIFY_CHUNK, off + length - pos)) for off, length in ranges
              for pos in range(off, off + length, VERIFY_CHUNK)]
    lanes = export.connections
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        def lane(index: int) -> list[Extent]:
            return [(o, n) for o, n in pieces[index::lanes]
                    if export.pread(index, n, o) != os.pread(fd, n, o)]

        with ThreadPoolExecutor(max_workers=lanes) as pool:
            return sorted(e for found in pool.map(lane, range(lanes)) for e in found)
    finally:
        os.close(fd)


class _ExportCopy:
    """One copy of EXPORT's EXTENTS into DESTINATION through its shadow."""

    export: NbdExport | NfsFile

    def __init__(self, export: NbdExport | NfsFile, destination: str, options: SyncOptions,
                 extents: ExtentArray, note: str) -> None:
        self.export, self.destination, self.options = export, destination, options
        self.extents, self.partial = extents, partial_path(destination)
        self.started = time.monotonic()
        self.result = SyncResult(status="ok", source=export.name, destination=destination,
                                 mode="copy", tracked=False, image_size=export.size,
                                 allocated_bytes=total_bytes(extents),
                                 target_downtime=options.target_downtime, notes=[note])

    def run(self) -> SyncResult:
        fd = claim_partial(self.partial)
        try:
            os.ftruncate(fd, self.export.size)
            self._copy(fd)
            os.fsync(fd)
            if self.options.verify:
                self._verify()
            self._publish(fd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.partial)
            raise
        finally:
            os.close(fd)
        self.result.elapsed = time.monotonic() - self.started
        return self.result

    def _copy(self, fd: int) -> None:
        total, done = self.export.size, self.export.size - total_bytes(self.extents)
        self._report("bulk", done, total)

        def progress(nbytes: int) -> None:
            nonlocal done
            done += nbytes
            self._report("bulk", done, total)

        with self._new_reader(fd) as reader:
            stats = reader.copy_extents(self.extents, dst_fresh=True, progress=progress)
        self.result.passes.append(PassRecord(0, "bulk", total, stats.seconds, 0,
                                             stats.bytes_written))
        self.result.bytes_copied = total
        self.result.bytes_written = stats.bytes_written
        self.result.notes.append(f"{self.export.connections} connection(s), up to "
                                 f"{reader.most_in_flight} reads in flight on one; "
                                 + self._skipped(stats))

    def _new_reader(self, fd: int) -> ConnectionCopier:
        assert isinstance(self.export, NbdExport)
        return ExportReader(self.export, fd, requests=self.options.requests,
                            rate_limit=self.options.rate_limit, dst_path=self.destination)

    def _skipped(self, stats: CopyStats) -> str:
        """What the copy did not have to read or write, for its note."""
        not_read = format_bytes(self.export.size - stats.bytes_read)
        return f"{not_read} the export called zero not read"

    def _verify(self) -> None:
        """Re-read the export where it held data then or holds data now (block
        status again) and compare with the shadow; everywhere else both read
        as zeros (the shadow was only written inside the first map)."""
        self._report("verify", 0, self.export.size)
        ranges = union(pairs(self.extents), pairs(self.export.data_extents()))
        differing = _differing_chunks(self.partial, self.export, ranges)
        if differing:
            off, length = differing[0]
            raise VerifyError(f"verify failed: {len(differing)} extents differ, first in "
                              f"{off}+{length} (was the export written during the copy?)",
                              self.destination)
        self.result.verified = True

    def _publish(self, fd: int) -> None:
        """Rename into place; a replaced copy's sidecar and manifest go first,
        they would describe the new bytes wrongly."""
        for stale in (sidecar_path(self.destination), manifest_path(self.destination)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(stale)
        os.rename(self.partial, self.destination)
        files.fsync_folder(os.path.dirname(self.destination))

    def _report(self, phase: str, done: int, total: int) -> None:
        if self.options.progress is None:
            return
        elapsed = time.monotonic() - self.started
        self.options.progress(SyncProgress(phase, 0, done, total,
                                           done / elapsed if elapsed > 0 else 0.0, 0, elapsed))


class _NfsFileCopy(_ExportCopy):
    """One copy of an NFS file into DESTINATION through its shadow: every
    byte read (NFSv3 has no block status), zero blocks not written."""

    def _new_reader(self, fd: int) -> ConnectionCopier:
        from blockmirror.copying.nfs import NfsFile, NfsFileReader

        assert isinstance(self.export, NfsFile)
        return NfsFileReader(self.export, fd, requests=self.options.requests,
                             rate_limit=self.options.rate_limit, dst_path=self.destination)

    def _skipped(self, stats: CopyStats) -> str:
        return (f"every byte read (NFSv3 cannot say where holes are), "
                f"{format_bytes(stats.bytes_zero)} of zero blocks not written")
