"""The digest manifest kept beside a blockmirror copy: ``DST.bm-manifest``.

It records what the copy is: which source series and change id it was taken
at, and one xxh3-64 digest per granule of its content. An incremental sync
asks the source's tracker for what changed since that change id; when the id
cannot be trusted (a writer crashed, the sidecar was reset), it falls back to
hashing the source and copying only granules whose digest differs — without
re-reading the copy.

Layout: a 4096-byte header (magic line, then JSON padded with spaces, then a
line with the xxh3-64 of the JSON), then ``granules`` little-endian uint64
digests, each stored XOR the digest of an all-zero granule so that zero
granules are stored as 0 and a sparse image's manifest stays sparse too
(all ones on disk means UNKNOWN). The digests are held in memory and written back with pwrite, never
memory-mapped: the copy may sit on NFS or FUSE, where shared mappings can be
refused (FUSE direct_io) or incoherent.

While a sync rewrites the copy the header says ``updating`` and the digests
of every granule about to change are set to UNKNOWN first (and made
durable), so a crash mid-update can only leave granules marked unknown —
never a digest that lies about the copy.

Format 2 (issue 13) binds a clean manifest to the copy it describes: the
header records the copy's device, inode, size, mtime and ctime, taken at
commit after the copy's final fsync. :meth:`Manifest.mismatch` compares them
with the copy as it is; any difference (the copy edited, truncated,
hole-punched, restored from another backup, or the manifest swapped for
another copy's) means neither the digests nor the change id say anything
about the copy, and :meth:`Manifest.mark_untrusted` makes every granule
unknown (state ``untrusted``) so the next sync re-copies the source's whole
range over the copy in place. A failed verify does the same. ctime can't be
set by users, so only a clock change could hide an edit; a copy on a
filesystem whose device number changes across mounts (some NFS and FUSE set-ups)
is re-copied in full after a remount - safe, only slower. Format 1 manifests
are refused (take a full copy with ``--force``).

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
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash

from blockmirror import files
from blockmirror.copying.copier import data_extents
from blockmirror.errors import BlockMirrorError
from blockmirror.extents import pairs

MAGIC = b"BMMANIFEST 2\n"
MAGIC_PREFIX = b"BMMANIFEST "
FORMAT_VERSION = 2
HEADER_BYTES = 4096
SUFFIX = ".bm-manifest"
TMP_SUFFIX = ".tmp"  # a new manifest's name until commit (see Manifest.discard)
UNKNOWN = 0  # a digest slot that says nothing; real digests are never 0
STORED_UNKNOWN = np.uint64(2**64 - 1)  # how UNKNOWN is stored (0 means "zero granule")
WRITE_CHUNK = 1 << 17  # digest slots per write: 1 MiB
READ_CHUNK = 8 << 20
STATE_CLEAN = "clean"
STATE_UPDATING = "updating"
# The digests say nothing (a failed verify, or the copy is not the file the
# manifest was made for): every granule is unknown until the next commit.
STATE_UNTRUSTED = "untrusted"
HASH_CHUNK = 8 << 20


class ManifestError(BlockMirrorError):
    """The manifest is missing, corrupt or belongs to another copy."""


def manifest_path(copy_path: str) -> str:
    return copy_path + SUFFIX


def _busy(path: str) -> ManifestError:
    return ManifestError(f"another sync is writing {path}")


def digest(block: bytes | memoryview) -> int:
    """The granule digest: xxh3-64, never UNKNOWN."""
    return xxhash.xxh3_64_intdigest(block) or 1


def zero_digest(length: int) -> int:
    return digest(bytes(length))


def copy_identity(fd: int) -> dict[str, int]:
    """What names one state of the copy open at FD: which file it is (device,
    inode), its size, and its change and modification times. ctime cannot be
    set by any user, so every write, truncate, hole punch, chmod or rename
    of the copy - or another file put in its place - changes this."""
    st = os.fstat(fd)
    return {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size,
            "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


@dataclass
class Manifest:
    """An open manifest: header fields plus the digest array (in memory).

    The file is opened once (a new one created exclusively, never through a
    link) and every read and write goes through that descriptor: the folder
    may be writable by others, and a name swapped for a symlink between two
    opens would make us write into whatever it points at (issue 13, item 2).
    Names are only used to create, publish (rename) and remove."""

    path: str
    granularity: int
    image_size: int
    series: str
    generation: int
    state: str
    source: str
    digests: np.ndarray  # uint64, one per granule, in memory; written back with pwrite
    publish_to: str | None = None  # a new manifest's final name, taken at commit
    fd: int = -1  # the manifest file, open for the manifest's whole life
    copy: dict[str, int] | None = None  # the copy's identity at the last commit
    copy_fd: int = -1  # the copy last digested by record(): commit binds to it
    rewrite_all: bool = False  # every slot must be written back at commit

    @property
    def change_id(self) -> str:
        return f"{self.series}:{self.generation}"

    # -- creating and opening -------------------------------------------------

    @classmethod
    def create(cls, path: str, *, granularity: int, image_size: int, source: str) -> Manifest:
        """A new manifest for a new copy: every granule taken for zeros (a new
        copy starts as one hole) until :meth:`record` says otherwise. It is
        built under a temporary name (PATH + ".tmp", created exclusively,
        never through a link, and flock-ed for its life) and takes PATH only
        at :meth:`commit`, so no half-made manifest can ever vouch for a
        copy. If the run fails before the commit, call :meth:`discard`."""
        granules = -(-image_size // granularity)
        tmp = path + TMP_SUFFIX
        # 0600 and never through a link: whoever can edit the digests can make
        # a hash resync skip blocks (the same trust rule as the sidecar, I5).
        fd = files.create_locked(tmp, _busy)
        try:
            os.ftruncate(fd, HEADER_BYTES + 8 * granules)  # holes: stored zeros
            digests = np.full(granules, zero_digest(granularity), dtype="<u8")
            if granules and image_size % granularity:
                digests[-1] = zero_digest(image_size % granularity)
            m = cls(path=tmp, granularity=granularity, image_size=image_size, series="",
                    generation=0, state=STATE_UPDATING, source=source, digests=digests,
                    fd=fd)
            m.publish_to = path
            m.write_header()
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
        owned by another user, a corrupt one, and format 1 (it did not bind
        the digests to the copy: take a full copy with --force)."""
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
        header = files.pread_full(fd, HEADER_BYTES, 0)
        if not header.startswith(MAGIC):
            if header.startswith(MAGIC_PREFIX):
                version = header[len(MAGIC_PREFIX):].split(b"\n", 1)[0][:8]
                raise ManifestError(
                    f"manifest {path} has format {version.decode(errors='replace')}, which "
                    f"this blockmirror does not trust (format {FORMAT_VERSION} binds the "
                    "digests to the copy they describe); take a full copy with --force"
                )
            raise ManifestError(f"{path} is not a blockmirror manifest")
        try:
            body, check = header[len(MAGIC):].rstrip(b" \n\0").rsplit(b"\n", 1)
            if xxhash.xxh3_64_hexdigest(body) != check.decode():
                raise ValueError("checksum")
            meta = json.loads(body)
            granularity = int(meta["granularity"])
            image_size = int(meta["image_size"])
            copy = meta.get("copy")
            if copy is not None:
                copy = {k: int(copy[k]) for k in ("dev", "ino", "size", "mtime_ns", "ctime_ns")}
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, AttributeError):
            raise ManifestError(f"manifest {path} has a corrupt header") from None
        granules = -(-image_size // granularity) if granularity > 0 else -1
        if granules < 0 or st.st_size != HEADER_BYTES + 8 * granules:
            raise ManifestError(f"manifest {path} is truncated or has the wrong size")
        state = str(meta["state"])
        if state == STATE_UNTRUSTED:
            digests = np.zeros(granules, dtype="<u8")  # all UNKNOWN; the file's say nothing
        else:
            buf = bytearray(8 * granules)
            view = memoryview(buf)
            for start in range(0, len(view), READ_CHUNK):
                chunk = view[start:start + READ_CHUNK]
                if os.preadv(fd, [chunk], HEADER_BYTES + start) != len(chunk):
                    raise ManifestError(f"manifest {path} is truncated")
            digests = _decode(np.frombuffer(buf, dtype="<u8"), granularity)
        m = cls(path=path, granularity=granularity, image_size=image_size,
                series=str(meta["series"]), generation=int(meta["generation"]),
                state=state, source=str(meta.get("source", "")), digests=digests, fd=fd,
                copy=copy, rewrite_all=state == STATE_UNTRUSTED)
        if m.state == STATE_CLEAN and meta.get("digests_xxh3") != m.digests_checksum():
            raise ManifestError(f"manifest {path} digests are corrupt (checksum mismatch)")
        return m

    def digests_checksum(self) -> str:
        return xxhash.xxh3_64_hexdigest(np.ascontiguousarray(self.digests).tobytes())

    def _fd(self) -> int:
        if self.fd < 0:
            raise ManifestError(f"manifest {self.path} is closed")
        return self.fd

    def write_header(self) -> None:
        meta: dict[str, Any] = {
            "granularity": self.granularity, "image_size": self.image_size,
            "series": self.series, "generation": self.generation, "state": self.state,
            "source": self.source, "format": FORMAT_VERSION,
        }
        if self.state == STATE_CLEAN:
            meta["digests_xxh3"] = self.digests_checksum()
        if self.copy is not None:
            meta["copy"] = self.copy  # as bound at the last commit
        body = json.dumps(meta, sort_keys=True).encode()
        header = MAGIC + body + b"\n" + xxhash.xxh3_64_hexdigest(body).encode() + b"\n"
        if len(header) > HEADER_BYTES:
            raise ManifestError("manifest header too long (source path?)")
        _pwrite_all(self._fd(), header.ljust(HEADER_BYTES, b" "), 0)
        os.fsync(self._fd())

    def write_digests(self, first: int = 0, last: int | None = None, *,
                      skip_zeros: bool = False) -> None:
        """Write digest slots [FIRST, LAST) back to the file and fsync. With
        SKIP_ZEROS (a new file, all holes) chunks of zero granules are left
        unwritten, so they stay holes."""
        last = len(self.digests) if last is None else last
        fd = self._fd()
        for start in range(first, last, WRITE_CHUNK):
            stored = _encode(self.digests[start:min(last, start + WRITE_CHUNK)],
                             self.granularity)
            if skip_zeros and not stored.any():
                continue
            _pwrite_all(fd, stored.tobytes(), HEADER_BYTES + 8 * start)
        os.fsync(fd)

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
        unknown until the next :meth:`commit` (which then writes every slot).

        For a copy the manifest does not describe (:meth:`mismatch`) and for
        a copy that failed verify - never leave such a manifest clean. A
        sync over an untrusted manifest must treat the whole copy as unknown:
        its change id says nothing (the copy may hold bytes the source never
        had), so it re-copies the source's whole range in place, holes
        included (the copy may have data where the source has holes) - which
        is what the hash resync does with every digest unknown."""
        self.digests[:] = UNKNOWN
        self.state = STATE_UNTRUSTED
        self.rewrite_all = True
        self.write_header()

    # -- the update protocol ----------------------------------------------------

    def resize(self, image_size: int) -> None:
        """Follow the copy's size; new granules start UNKNOWN."""
        if image_size == self.image_size:
            return
        granules = -(-image_size // self.granularity)
        old = len(self.digests)
        resized = np.zeros(granules, dtype="<u8")
        keep = min(old, granules)
        resized[:keep] = self.digests[:keep]
        # The old last granule may have grown or been cut: its digest no
        # longer holds; new granules start unknown (zeros).
        if keep:
            resized[keep - 1] = UNKNOWN
        self.digests = resized
        self.image_size = image_size
        os.ftruncate(self._fd(), HEADER_BYTES + 8 * granules)
        self.write_digests(max(0, keep - 1))

    def begin_update(self) -> None:
        """Say, durably, that the copy is about to change. An untrusted
        manifest stays untrusted."""
        if self.state == STATE_CLEAN:
            self.state = STATE_UPDATING
            self.write_header()

    def forget(self, extents: Iterable[tuple[int, int]]) -> None:
        """Mark the granules under EXTENTS unknown and make it durable; call
        before those bytes of the copy are rewritten."""
        ranges = list(self._granule_ranges(extents))
        for first, last in ranges:
            self.digests[first:last] = UNKNOWN
        if len(ranges) <= 64:
            for first, last in ranges:
                self.write_digests(first, last)
        else:  # many small ranges: one write over their span costs less
            self.write_digests(ranges[0][0], max(last for _, last in ranges))

    def record(self, fd: int, extents: Iterable[tuple[int, int]], workers: int = 4) -> None:
        """Digest the copy's granules under EXTENTS (read from FD), several
        chunks in flight: on NFS each read pays a round trip. FD is also the
        copy :meth:`commit` binds the manifest to, unless given another."""
        g = self.granularity
        self.copy_fd = fd
        step = max(1, HASH_CHUNK // g)
        spans = [(start, min(last, start + step))
                 for first, last in self._granule_ranges(extents)
                 for start in range(first, last, step)]

        def work(span: tuple[int, int]) -> None:
            start, stop = span
            offset = start * g
            length = min(self.image_size, stop * g) - offset
            view = memoryview(_pread_full(fd, length, offset))
            for i in range(stop - start):
                self.digests[start + i] = digest(view[i * g:(i + 1) * g])

        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(work, spans))

    def commit(self, series: str, generation: int,
               recorded: Iterable[tuple[int, int]] | None = None, *,
               copy_fd: int | None = None) -> None:
        """The copy is now exactly the source at change id SERIES:GENERATION.

        Writes back the digests under RECORDED (byte extents; all of them
        when None), binds the manifest to the copy open at COPY_FD (default:
        the one :meth:`record` last read) by its identity taken now - call
        after the copy's final fsync and rename -, then writes the header; a
        new manifest then takes its name."""
        if self.publish_to is not None:
            self.write_digests(skip_zeros=True)
        elif recorded is None or self.rewrite_all:
            self.write_digests()
        else:
            for first, last in self._granule_ranges(recorded):
                self.write_digests(first, last)
        self.rewrite_all = False
        bind = self.copy_fd if copy_fd is None else copy_fd
        self.copy = copy_identity(bind) if bind >= 0 else None
        self.series, self.generation, self.state = series, generation, STATE_CLEAN
        self.write_header()
        if self.publish_to is not None:
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

    def unknown_extents(self) -> list[tuple[int, int]]:
        """Byte extents of granules whose digest is UNKNOWN."""
        return _runs(np.flatnonzero(self.digests == UNKNOWN), self.granularity, self.image_size)

    def _granule_ranges(self, extents: Iterable[tuple[int, int]]) -> Iterable[tuple[int, int]]:
        g = self.granularity
        total = len(self.digests)
        for offset, length in extents:
            if length <= 0:
                continue
            first = int(offset) // g
            last = min(total, -(-(int(offset) + int(length)) // g))
            if first < last:
                yield first, last


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _encode(digests: np.ndarray, granularity: int) -> np.ndarray:
    """In-memory digests -> stored form (see the module's docstring)."""
    stored = digests ^ np.uint64(zero_digest(granularity))
    stored[digests == UNKNOWN] = STORED_UNKNOWN
    return stored.astype("<u8", copy=False)


def _decode(stored: np.ndarray, granularity: int) -> np.ndarray:
    digests = stored ^ np.uint64(zero_digest(granularity))
    digests[stored == STORED_UNKNOWN] = UNKNOWN
    return digests.astype("<u8", copy=False)


def source_digests(fd: int, size: int, granularity: int, workers: int = 4) -> np.ndarray:
    """Digest every granule of the source FD (holes are not read)."""
    granules = -(-size // granularity)
    out = np.empty(granules, dtype="<u8")
    out[:] = zero_digest(granularity)
    if granules and size % granularity:
        out[-1] = zero_digest(size % granularity)
    m = Manifest(path="", granularity=granularity, image_size=size, series="", generation=0,
                 state=STATE_UPDATING, source="", digests=out)
    m.record(fd, pairs(data_extents(fd, size)), workers=workers)
    return out


def differing_extents(manifest: Manifest, fd: int, size: int, workers: int = 4) -> list[
    tuple[int, int]
]:
    """Hash resync: byte extents of granules where the source differs from
    what the manifest says the copy holds (unknown granules always differ)."""
    src = source_digests(fd, size, manifest.granularity, workers)
    n = min(len(src), len(manifest.digests))
    differ = np.flatnonzero(src[:n] != manifest.digests[:n])
    if len(src) > n:
        differ = np.concatenate((differ, np.arange(n, len(src))))
    return _runs(differ, manifest.granularity, size)


def _runs(granules: np.ndarray, granularity: int, size: int) -> list[tuple[int, int]]:
    if len(granules) == 0:
        return []
    breaks = np.flatnonzero(np.diff(granules) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(granules)])) - 1
    out = []
    for s, e in zip(granules[starts].tolist(), granules[ends].tolist(), strict=True):
        offset = s * granularity
        out.append((offset, min(size, (e + 1) * granularity) - offset))
    return out


def _pread_full(fd: int, length: int, offset: int) -> bytes:
    """LENGTH bytes at OFFSET; past the end reads as zeros."""
    return files.pread_full(fd, length, offset).ljust(length, b"\0")
