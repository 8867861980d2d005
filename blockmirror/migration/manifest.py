"""The digest manifest kept beside a blockmirror copy: ``DST.bm-manifest``.

It records what the copy is: which source series and change id it was taken
at, and what each granule of the copy holds (a :class:`DigestTable`: zero,
unknown, or an xxh3-64 digest). An incremental sync asks the source's
tracker for what changed since that change id; when the id cannot be
trusted (a writer crashed, the sidecar was reset), it falls back to hashing
the source and copying only granules whose digest differs - without
re-reading the copy.

Format 3 (issue 11) costs what the copy's data costs, not its apparent
size, on disk and in memory. Layout:

- a 4096-byte header: magic line, JSON padded with spaces, then a line with
  the xxh3-64 of the JSON. The JSON says where the **body** is (offset,
  counts) and holds the body's checksum;
- the body: the unknown runs (pairs of granule indices), then the granule
  indices that hold data, then their digests; little-endian uint64. Zero
  granules are not stored at all;
- right after the body, while a sync updates the copy: the **journal**,
  fixed-size records appended (and fsynced) one per change - "these granules
  become unknown", "the copy now has this size" - each bound to the body it
  extends and checksummed.

The digests are held in memory and written back with pwrite, never
memory-mapped: the copy may sit on NFS or FUSE, where shared mappings can be
refused (FUSE direct_io) or incoherent.

While a sync rewrites the copy the header says ``updating`` and every
granule about to change is journalled unknown first (durably), so a crash
mid-update can only leave granules marked unknown - never a digest that lies
about the copy. A commit writes a whole new body where it overlaps neither
the current body nor its journal, fsyncs it, then points the header at it:
a crash at any instant leaves one consistent state (a torn header fails its
checksum and is refused).

The header binds a clean manifest to the copy it describes (issue 13): the
copy's device, inode, size, mtime and ctime, taken at commit after the
copy's final fsync. :meth:`Manifest.mismatch` compares them with the copy as
it is; any difference (the copy edited, truncated, hole-punched, restored
from another backup, or the manifest swapped for another copy's) means
neither the digests nor the change id say anything about the copy, and
:meth:`Manifest.mark_untrusted` makes every granule unknown (state
``untrusted``) so the next sync re-copies the copy's data in place. A failed
verify does the same. ctime can't be set by users, so only a clock change
could hide an edit; a copy on a filesystem whose device number changes
across mounts (some NFS and FUSE set-ups) is re-copied after a remount -
safe, only slower.

Older formats: format 1 is refused (take a full copy with ``--force``);
format 2 (one dense digest slot per granule of apparent size) is not read
any more - it is raised as :class:`OldManifestError`, and the incremental
sync rebuilds a format 3 manifest by hashing the copy's data (then a hash
resync against the source).

The file is opened once and used only through that descriptor (never
reopened by name): a folder writable by others cannot redirect our writes
with a planted symlink. A new manifest lives under ``DST.bm-manifest.tmp``
(created exclusively, flock-ed) until :meth:`Manifest.commit` renames it;
:meth:`Manifest.discard` removes it if the run fails first.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import struct
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import xxhash

from blockmirror import files
from blockmirror.copying.copier import data_extents, digest_granules
from blockmirror.errors import BlockMirrorError
from blockmirror.extents import Extent, pairs
from blockmirror.migration import digests as dg
from blockmirror.migration.digests import UNKNOWN, DigestTable, digest, zero_digest
from blockmirror.migration.manifest_names import MAGIC_PREFIX as MAGIC_PREFIX
from blockmirror.migration.manifest_names import SUFFIX as SUFFIX
from blockmirror.migration.manifest_names import TMP_SUFFIX as TMP_SUFFIX

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
else:
    from blockmirror._numpy import np  # on first use (see blockmirror._numpy)

MAGIC = b"BMMANIFEST 3\n"
FORMAT_VERSION = 3
HEADER_BYTES = 4096
STATE_CLEAN = "clean"
STATE_UPDATING = "updating"
# The digests say nothing (a failed verify, or the copy is not the file the
# manifest was made for): every granule is unknown until the next commit.
STATE_UNTRUSTED = "untrusted"
HASH_CHUNK = 8 << 20
# Journal records: kind, two arguments, the body's checksum, the record's own.
RECORD = struct.Struct("<5Q")
FORGET, RESIZE = 1, 2
# Bytes a stored granule of data costs at most: index and digest, in two
# bodies (the current one and the one a commit writes beside it).
STORED_BYTES_PER_GRANULE = 32
# At most this many granules are read back without numpy at a new copy's
# commit (those its bulk pass did not see whole); more take the numpy path.
PLAIN_RECORD_GRANULES = 256

__all__ = [
    "UNKNOWN",
    "Manifest",
    "ManifestError",
    "OldManifestError",
    "differing_extents",
    "digest",
    "manifest_path",
    "stored_bytes",
    "zero_digest",
]


class ManifestError(BlockMirrorError):
    """The manifest is missing, corrupt or belongs to another copy."""


class OldManifestError(ManifestError):
    """A manifest of an older format that can be rebuilt from the copy."""


def manifest_path(copy_path: str) -> str:
    return copy_path + SUFFIX


def stored_bytes(allocated: int, granularity: int) -> int:
    """Disk a manifest of a copy with ALLOCATED bytes of data needs at worst."""
    return HEADER_BYTES + STORED_BYTES_PER_GRANULE * -(-allocated // granularity)


def _busy(path: str) -> ManifestError:
    return ManifestError(f"another sync is writing {path}")


def copy_identity(fd: int) -> dict[str, int]:
    """What names one state of the copy open at FD: which file it is (device,
    inode), its size, and its change and modification times. ctime cannot be
    set by any user, so every write, truncate, hole punch, chmod or rename
    of the copy - or another file put in its place - changes this."""
    st = os.fstat(fd)
    return {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size,
            "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


class Body:
    """Where the stored table is: offset and length of the body, its
    checksum (also the journal's epoch), and where the journal ends.
    (Plain classes here, not dataclasses: making one costs ~0.5 ms of every
    sync's start.)"""

    __slots__ = ("checksum", "data_granules", "journal_end", "length", "offset",
                 "unknown_runs")

    def __init__(self, offset: int = HEADER_BYTES, length: int = 0, checksum: str = "",
                 journal_end: int = HEADER_BYTES, *, unknown_runs: int = 0,
                 data_granules: int = 0) -> None:
        self.offset, self.length, self.checksum = offset, length, checksum
        self.journal_end = journal_end
        self.unknown_runs, self.data_granules = unknown_runs, data_granules

    @property
    def epoch(self) -> int:
        return int(self.checksum, 16) if self.checksum else 0


class Manifest:
    """An open manifest: header fields plus the digest table (in memory).

    The file is opened once (a new one created exclusively, never through a
    link) and every read and write goes through that descriptor: the folder
    may be writable by others, and a name swapped for a symlink between two
    opens would make us write into whatever it points at (issue 13, item 2).
    Names are only used to create, publish (rename) and remove."""

    def __init__(self, *, path: str, granularity: int, image_size: int, series: str,
                 generation: int, state: str, source: str, table: DigestTable,
                 fd: int = -1, copy: dict[str, int] | None = None,
                 body: Body | None = None) -> None:
        self.path = path
        self.granularity = granularity
        self.image_size = image_size
        self.series = series
        self.generation = generation
        self.state = state
        self.source = source
        self.table = table
        self.publish_to: str | None = None  # a new manifest's final name, taken at commit
        self.fd = fd  # the manifest file, open for the manifest's whole life
        self.copy = copy  # the copy's identity at the last commit
        self.copy_fd = -1  # the copy last digested by record(): commit binds to it
        self.body = Body() if body is None else body

    @property
    def change_id(self) -> str:
        return f"{self.series}:{self.generation}"

    # -- creating and opening -------------------------------------------------

    @classmethod
    def create(cls, path: str, *, granularity: int, image_size: int, source: str,
               table: DigestTable | None = None) -> Manifest:
        """A new manifest for a new copy: every granule taken for zeros (a new
        copy starts as one hole) until :meth:`record` says otherwise - or, if
        given, what TABLE says (what the copy's passes learnt while they
        copied: digests taken from their buffers, unknown where they wrote
        without seeing a granule whole). It is
        built under a temporary name (PATH + ".tmp", created exclusively,
        never through a link, and flock-ed for its life) and takes PATH only
        at :meth:`commit`, so no half-made manifest can ever vouch for a
        copy. If the run fails before the commit, call :meth:`discard`."""
        tmp = path + TMP_SUFFIX
        # 0600 and never through a link: whoever can edit the digests can make
        # a hash resync skip blocks (the same trust rule as the sidecar, I5).
        fd = files.create_locked(tmp, _busy)
        try:
            if table is None:
                table = DigestTable(granularity, image_size)
            elif table.granularity != granularity:
                raise ValueError("the table's granularity is not the manifest's")
            table.resize(image_size)
            m = cls(path=tmp, granularity=granularity, image_size=image_size, series="",
                    generation=0, state=STATE_UPDATING, source=source, table=table, fd=fd)
            m.body.checksum = xxhash.xxh3_64_hexdigest(b"")  # the empty body
            m.publish_to = path
            m.write_header(durable=False)  # nothing trusts it before its commit
        except BaseException:
            with contextlib.suppress(OSError):
                if files.same_file(fd, tmp):
                    os.unlink(tmp)
            os.close(fd)
            raise
        return m

    @classmethod
    def open(cls, path: str) -> Manifest:
        """Open an earlier copy's manifest for an incremental update (read and
        write, through one descriptor). Refused: a link, a file with more than
        one name, anything but a regular file, one writable by others or
        owned by another user, a corrupt one, and older formats (format 2:
        :class:`OldManifestError`, rebuilt from the copy by the caller)."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise ManifestError(f"no manifest at {path}") from None
        except OSError as e:
            raise ManifestError(f"manifest {path} cannot be opened: {e.strerror}") from None
        try:
            return cls._read(path, fd)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def _read(cls, path: str, fd: int) -> Manifest:
        st = os.fstat(fd)
        _check_trust(path, st)
        meta = _read_header(path, fd)
        try:
            granularity = int(meta["granularity"])
            image_size = int(meta["image_size"])
            copy = meta.get("copy")
            if copy is not None:
                copy = {k: int(copy[k]) for k in ("dev", "ino", "size", "mtime_ns", "ctime_ns")}
            where = meta["body"]
            body = Body(int(where["offset"]), int(where["length"]), str(where["xxh3"]),
                        unknown_runs=int(where["unknown_runs"]),
                        data_granules=int(where["data_granules"]))
            state = str(meta["state"])
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ManifestError(f"manifest {path} has a corrupt header") from None
        if (granularity <= 0 or image_size < 0 or body.offset < HEADER_BYTES
                or min(body.unknown_runs, body.data_granules) < 0
                or body.length != 16 * (body.unknown_runs + body.data_granules)
                or st.st_size < body.offset + body.length):
            raise ManifestError(f"manifest {path} is truncated or has the wrong size")
        table = DigestTable(granularity, image_size)
        m = cls(path=path, granularity=granularity, image_size=image_size,
                series=str(meta["series"]), generation=int(meta["generation"]),
                state=state, source=str(meta.get("source", "")), table=table, fd=fd,
                copy=copy, body=body)
        if state == STATE_UNTRUSTED:
            table.forget_all()  # the stored table says nothing
        else:
            m._load_body()
        body.journal_end = body.offset + body.length
        if state == STATE_UPDATING:
            m._replay_journal(st.st_size)
        return m

    def _load_body(self) -> None:
        """Read and check the stored table: its checksum, and that it is
        well formed (a table that is not could make a resync skip blocks)."""
        body = self.body
        raw = files.pread_full(self._fd(), body.length, body.offset)
        if len(raw) != body.length:
            raise ManifestError(f"manifest {self.path} is truncated")
        if xxhash.xxh3_64_hexdigest(raw) != body.checksum:
            raise ManifestError(f"manifest {self.path} digests are corrupt (checksum mismatch)")
        words = np.frombuffer(raw, dtype="<u8")
        runs, data = body.unknown_runs * 2, body.data_granules
        table = self.table
        unknown = words[:runs].astype(np.int64).reshape(-1, 2)
        keys = words[runs:runs + data].astype(np.int64)
        values = words[runs + data:].astype(np.uint64)
        n = table.granules
        ok = (bool(np.all(unknown[:, 0] < unknown[:, 1]))
              and bool(np.all(unknown[1:, 0] > unknown[:-1, 1]))
              and (len(unknown) == 0 or (unknown[0, 0] >= 0 and unknown[-1, 1] <= n))
              and bool(np.all(np.diff(keys) > 0))
              and (len(keys) == 0 or (keys[0] >= 0 and keys[-1] < n))
              and bool(np.all(values != UNKNOWN)))
        if not ok or np.any(dg._covers(unknown, keys)):
            raise ManifestError(f"manifest {self.path} digests are corrupt (malformed table)")
        table.unknown, table.keys, table.values = unknown, keys, values

    def _replay_journal(self, file_size: int) -> None:
        """Apply the records a sync appended while it updated the copy, up to
        the first that is torn or belongs to another body (what follows it
        was never made durable, so no byte of the copy depends on it)."""
        body = self.body
        pos = body.journal_end
        forgets: list[tuple[int, int]] = []
        while pos + RECORD.size <= file_size:
            raw = files.pread_full(self._fd(), RECORD.size, pos)
            kind, a, b, epoch, check = RECORD.unpack(raw)
            if check != xxhash.xxh3_64_intdigest(raw[:-8]) or epoch != body.epoch:
                break
            if kind == FORGET and a < b:
                forgets.append((a, b))
            elif kind == RESIZE:
                self._forget_granules(forgets)
                forgets = []
                self.table.resize(a)
                self.image_size = a
            else:
                raise ManifestError(f"manifest {self.path} has a corrupt journal")
            pos += RECORD.size
        self._forget_granules(forgets)
        body.journal_end = pos

    def _forget_granules(self, runs: list[tuple[int, int]]) -> None:
        if runs:
            arr = np.array(sorted(runs), dtype=np.int64)
            self.table.forget(dg._merge(arr[:, 0], arr[:, 1]))

    def _append(self, records: list[tuple[int, int, int]]) -> None:
        """Append journal RECORDS (kind, a, b) durably."""
        if not records:
            return
        epoch = self.body.epoch
        out = bytearray()
        for kind, a, b in records:
            head = RECORD.pack(kind, a, b, epoch, 0)[:-8]
            out += head + struct.pack("<Q", xxhash.xxh3_64_intdigest(head))
        _pwrite_all(self._fd(), bytes(out), self.body.journal_end)
        os.fsync(self._fd())
        self.body.journal_end += len(out)

    def _fd(self) -> int:
        if self.fd < 0:
            raise ManifestError(f"manifest {self.path} is closed")
        return self.fd

    def write_header(self, *, durable: bool = True) -> None:
        body = self.body
        meta: dict[str, Any] = {
            "granularity": self.granularity, "image_size": self.image_size,
            "series": self.series, "generation": self.generation, "state": self.state,
            "source": self.source, "format": FORMAT_VERSION,
            "body": {"offset": body.offset, "length": body.length, "xxh3": body.checksum,
                     "unknown_runs": body.unknown_runs, "data_granules": body.data_granules},
        }
        if self.copy is not None:
            meta["copy"] = self.copy  # as bound at the last commit
        header = _header_bytes(meta)
        _pwrite_all(self._fd(), header, 0)
        if durable:
            os.fsync(self._fd())

    def _write_body(self, *, durable: bool = True) -> None:
        """Write the in-memory table as a new body where it overlaps neither
        the current body nor its journal (a crash before the header points
        at it changes nothing), and fsync it (if DURABLE)."""
        raw, unknown_runs, data_granules = self.table.body()
        current = self.body
        if HEADER_BYTES + len(raw) <= current.offset:
            offset = HEADER_BYTES
        else:
            offset = -(-max(current.journal_end, os.fstat(self._fd()).st_size) // 4096) * 4096
        _pwrite_all(self._fd(), raw, offset)
        if durable:
            os.fsync(self._fd())
        self.body = Body(offset, len(raw), xxhash.xxh3_64_hexdigest(raw), offset + len(raw),
                         unknown_runs=unknown_runs, data_granules=data_granules)


    def close(self) -> None:
        """Close the manifest's descriptor. An unpublished new manifest keeps
        its temporary name; :meth:`discard` removes it."""
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1

    def discard(self) -> None:
        """A run that fails before :meth:`commit`: remove the new manifest
        this object created (its temporary name, only while it still names
        our file), and close it. Does nothing to a published or an opened
        manifest beyond closing it. Safe to call twice."""
        if self.publish_to is not None and self.fd >= 0:
            with contextlib.suppress(OSError):
                if files.same_file(self.fd, self.path):
                    os.unlink(self.path)
        self.close()

    abandon = discard

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter shutdown: nothing to report to
            self.close()

    # -- the binding to the copy (issue 13, item 6) -------------------------------

    def mismatch(self, copy_fd: int) -> str | None:
        """Why this manifest does not describe the copy open at COPY_FD, or
        None when it does.

        A clean manifest describes exactly the file, in exactly the state,
        it was bound to at its commit (device, inode, size, mtime, ctime).
        Anything else - the copy edited, truncated, hole-punched, restored
        from another backup, replaced, or the manifest swapped for another
        copy's - means neither the digests nor the change id can be
        trusted: see :meth:`mark_untrusted`.

        An ``updating`` manifest (a sync died mid-update) is checked only
        for being about the same file (device and inode): that sync's own
        writes moved the times and maybe the size, and its unknown granules
        are marked; its other digests are trusted as before (the hash
        resync's promise). An ``untrusted`` one describes nothing."""
        if self.state == STATE_UNTRUSTED:
            return "the manifest is marked untrusted (a failed verify, or a changed copy)"
        if self.copy is None:
            return "the manifest does not record which copy it describes"
        now = copy_identity(copy_fd)
        if (now["dev"], now["ino"]) != (self.copy["dev"], self.copy["ino"]):
            return "the copy is not the file the manifest was made for (replaced or restored)"
        if self.state != STATE_CLEAN:
            return None
        if now["size"] != self.copy["size"] or now["size"] != self.image_size:
            return (f"the copy's size changed since its manifest was written "
                    f"({self.copy['size']} -> {now['size']})")
        if (now["mtime_ns"], now["ctime_ns"]) != (self.copy["mtime_ns"], self.copy["ctime_ns"]):
            return "the copy was changed since its manifest was written"
        return None

    def check_copy(self, copy_fd: int) -> str | None:
        """The one call an incremental sync makes when it has opened (and
        locked) the copy at COPY_FD, before anything changes it: None when
        the manifest can be used as it is; otherwise the manifest is marked
        untrusted, durably (every granule unknown: the sync then re-copies
        the source's whole range in place), and the reason is returned for
        the result's notes. An already untrusted manifest returns None."""
        if self.state == STATE_UNTRUSTED:
            return None
        reason = self.mismatch(copy_fd)
        if reason is not None:
            self.mark_untrusted()
        return reason

    def describes(self, copy_fd: int) -> bool:
        """True when this manifest describes the copy open at COPY_FD (see
        :meth:`mismatch` for the reason when it does not)."""
        return self.mismatch(copy_fd) is None

    def mark_untrusted(self) -> None:
        """Say, durably, that the digests describe nothing: every granule is
        unknown until the next :meth:`commit` (which then writes the whole table).

        For a copy the manifest does not describe (:meth:`mismatch`) and for
        a copy that failed verify - never leave such a manifest clean. A
        sync over an untrusted manifest must treat the whole copy as unknown:
        its change id says nothing (the copy may hold bytes the source never
        had), so it re-copies, in place, everything where either the source
        or the copy has data (the copy may have data where the source has
        holes; where both have holes both read as zeros)."""
        self.table.forget_all()
        self.state = STATE_UNTRUSTED
        self.write_header()

    # -- the update protocol ----------------------------------------------------

    def resize(self, image_size: int) -> None:
        """Follow the copy's size, durably: the old last granule (grown or
        cut) and new granules become unknown."""
        if image_size == self.image_size:
            return
        self._append([(RESIZE, image_size, 0)])
        self.table.resize(image_size)
        self.image_size = image_size

    def begin_update(self) -> None:
        """Say, durably, that the copy is about to change. An untrusted
        manifest stays untrusted."""
        if self.state == STATE_CLEAN:
            self.state = STATE_UPDATING
            self.write_header()

    def forget(self, extents: Iterable[Extent]) -> None:
        """Mark the granules under EXTENTS unknown and make it durable; call
        before those bytes of the copy are rewritten."""
        runs = dg.granule_runs(extents, self.granularity, self.table.granules)
        if not len(runs):
            return
        if self.state == STATE_UNTRUSTED:
            self.table.forget(runs)  # the file already says every granule is unknown
            return
        if self.state == STATE_CLEAN:
            raise ManifestError("forget() on a clean manifest: call begin_update() first")
        self._append([(FORGET, int(s), int(e)) for s, e in runs.tolist()])
        self.table.forget(runs)

    def assume_zero_outside(self, extents: Iterable[Extent]) -> None:
        """For a copy about to be re-copied over EXTENTS, which cover all of
        its data: the granules outside them read as zeros, those inside are
        unknown. Only in memory - the file keeps saying what it said (an
        untrusted manifest stays untrusted until the commit)."""
        table = DigestTable(self.granularity, self.image_size)
        table.forget(dg.granule_runs(extents, self.granularity, table.granules))
        self.table = table

    def record(self, fd: int, extents: Iterable[Extent], workers: int = 4) -> None:
        """Digest the copy's granules under EXTENTS (read from FD, several
        chunks in flight: on NFS each read pays a round trip). Only the
        copy's data is read: granules in its holes are zeros. FD is also the
        copy :meth:`commit` binds the manifest to, unless given another."""
        self.copy_fd = fd
        table = self.table
        if table.plain and self._record_few(fd, extents):
            return
        runs = dg.granule_runs(extents, self.granularity, table.granules)
        if not len(runs):
            return
        keys, values, holes = hash_granules(fd, runs, self.granularity, self.image_size,
                                            workers)
        table.set_zero(holes)
        table.put(keys, values)

    def _record_few(self, fd: int, extents: Iterable[Extent]) -> bool:
        """:meth:`record` for a plain table (a new copy's, learnt from its
        bulk pass) and at most PLAIN_RECORD_GRANULES granules - the few no
        pass saw whole, such as a short last one: read and hashed here,
        without numpy. False (nothing done) for more."""
        g, table = self.granularity, self.table
        granules: list[int] = []
        for offset, length in extents:
            if length > 0:
                granules.extend(range(offset // g, min(table.granules, -(-(offset + length) // g))))
            if len(granules) > PLAIN_RECORD_GRANULES:
                return False
        found = []
        for k in sorted(set(granules)):
            offset = k * g
            length = min(self.image_size, offset + g) - offset
            found.append((k, digest(files.pread_full(fd, length, offset).ljust(length, b"\0"))))
        table.put_plain(found)
        return True

    def commit(self, series: str, generation: int,
               recorded: Iterable[Extent] | None = None, *,
               copy_fd: int | None = None) -> None:
        """The copy is now exactly the source at change id SERIES:GENERATION.

        Writes the whole table as a new body (it costs what the copy's data
        does, so RECORDED, what the caller recorded, needs no special
        treatment; granules still unknown stay unknown), binds the manifest to
        the copy open at COPY_FD (default: the one :meth:`record` last read)
        by its identity taken now - call after the copy's final fsync and
        rename -, then writes the header; a new manifest then takes its name."""
        # An unpublished manifest is trusted by nobody until its rename: one
        # fsync of body and header together, before the rename, is enough.
        # A published one must have its body on disk before the header
        # points at it.
        fresh = self.publish_to is not None
        self._write_body(durable=not fresh)
        bind = self.copy_fd if copy_fd is None else copy_fd
        self.copy = copy_identity(bind) if bind >= 0 else None
        self.series, self.generation, self.state = series, generation, STATE_CLEAN
        self.write_header()
        if (self.body.offset == HEADER_BYTES
                and os.fstat(self._fd()).st_size != self.body.journal_end):
            os.ftruncate(self._fd(), self.body.journal_end)  # drop the old body
        if self.publish_to is not None:
            self._publish()

    def _publish(self) -> None:
        assert self.publish_to is not None
        final = self.publish_to
        os.replace(self.path, final)
        if not files.same_file(self._fd(), final):
            # Someone swapped the temporary name between our create and
            # the rename: what got published is not ours. Take it down.
            with contextlib.suppress(OSError):
                os.unlink(final)
            raise ManifestError(
                f"manifest {self.path} was replaced by another file before it was "
                "published; the folder is writable by someone else"
            )
        self.path, self.publish_to = final, None
        files.fsync_folder(os.path.dirname(os.path.abspath(self.path)))

    def unknown_extents(self) -> list[Extent]:
        """Byte extents of granules whose digest is UNKNOWN."""
        return self.table.unknown_extents()


def _check_trust(path: str, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise ManifestError(f"manifest {path} is not a regular file")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) or st.st_uid not in (0, os.geteuid()):
        raise ManifestError(
            f"manifest {path} is writable by others or owned by uid {st.st_uid}: its "
            "digests could make a resync skip blocks, so it is not trusted"
        )
    if st.st_nlink != 1:
        raise ManifestError(
            f"manifest {path} has {st.st_nlink} names (a hard link to it exists): "
            "not trusted"
        )


def _read_header(path: str, fd: int) -> dict[str, Any]:
    """The header's JSON, checked; older formats are named in the error."""
    header = files.pread_full(fd, HEADER_BYTES, 0)
    if not header.startswith(MAGIC):
        if header.startswith(MAGIC_PREFIX):
            version = header[len(MAGIC_PREFIX):].split(b"\n", 1)[0][:8]
            text = version.decode(errors="replace")
            if text == "2":
                raise OldManifestError(
                    f"manifest {path} has format 2 (one slot per granule of apparent size)")
            raise ManifestError(
                f"manifest {path} has format {text}, which this blockmirror does not "
                f"trust (format {FORMAT_VERSION} binds the digests to the copy they "
                "describe); take a full copy with --force"
            )
        raise ManifestError(f"{path} is not a blockmirror manifest")
    try:
        body, check = header[len(MAGIC):].rstrip(b" \n\0").rsplit(b"\n", 1)
        if xxhash.xxh3_64_hexdigest(body) != check.decode():
            raise ValueError("checksum")
        meta = json.loads(body)
        if not isinstance(meta, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError):
        raise ManifestError(f"manifest {path} has a corrupt header") from None
    return meta


def _header_bytes(meta: dict[str, Any]) -> bytes:
    body = json.dumps(meta, sort_keys=True).encode()
    header = MAGIC + body + b"\n" + xxhash.xxh3_64_hexdigest(body).encode() + b"\n"
    if len(header) > HEADER_BYTES:
        raise ManifestError("manifest header too long (source path?)")
    return header.ljust(HEADER_BYTES, b" ")


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def hash_granules(fd: int, runs: dg.Runs, granularity: int, size: int, workers: int = 4
                  ) -> tuple[npt.NDArray[np.int64], dg.U64, dg.Runs]:
    """Digest the granules of RUNS in the file FD of SIZE bytes, reading only
    its data (SEEK_DATA/SEEK_HOLE): returns the digested granules, their
    digests, and the runs that lie wholly in holes (zeros, not read)."""
    g = granularity
    data = dg.granule_runs(pairs(data_extents(fd, size)), g, -(-size // g))
    read = dg.intersect(runs, data)
    step = max(1, HASH_CHUNK // g)
    spans = [(start, min(stop, start + step))
             for first, stop in read.tolist() for start in range(first, stop, step)]

    def work(span: tuple[int, int]) -> npt.NDArray[np.uint64]:
        start, stop = span
        offset = start * g
        length = min(size, stop * g) - offset
        found = digest_granules(fd, offset, length, g)
        if found is not None:  # in C, the GIL released: the workers overlap
            return found
        view = memoryview(files.pread_full(fd, length, offset).ljust(length, b"\0"))
        return np.array([digest(view[i * g:(i + 1) * g]) for i in range(stop - start)],
                        dtype=np.uint64)

    if len(spans) > 1 and workers > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            found = list(pool.map(work, spans))
    else:
        found = [work(span) for span in spans]
    keys = dg.keys_of_runs(read)
    values = np.concatenate(found) if found else np.zeros(0, dtype=np.uint64)
    return keys, values, dg.subtract(runs, read)


def differing_extents(manifest: Manifest, fd: int, size: int, workers: int = 4
                      ) -> list[Extent]:
    """Hash resync: byte extents of granules where the source FD (of SIZE
    bytes) differs from what the manifest says the copy holds (unknown
    granules always differ). Reads only the source's data: where the source
    has a hole, a granule differs if the manifest says it is not zero."""
    g = manifest.granularity
    table = manifest.table
    if manifest.state == STATE_UNTRUSTED:
        return [(0, size)] if size else []
    granules = -(-size // g)
    everything = np.array([[0, granules]], dtype=np.int64) if granules else dg.no_runs()
    keys, values, holes = hash_granules(fd, everything, g, size, workers)
    known = keys < table.granules
    differ_keys = keys[known][values[known] != table.get(keys[known])]
    differ = dg.union(dg.runs_of_keys(differ_keys),
                      dg.intersect(holes, table.nonzero_runs()))
    if granules > table.granules:  # the source grew: the new granules are unknown
        differ = dg.union(differ, np.array([[table.granules, granules]], dtype=np.int64))
    return dg.byte_extents(differ, g, size)
