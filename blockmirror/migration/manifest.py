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

from blockmirror.copying.copier import data_extents
from blockmirror.errors import BlockMirrorError
from blockmirror.extents import pairs

MAGIC = b"BMMANIFEST 1\n"
HEADER_BYTES = 4096
SUFFIX = ".bm-manifest"
UNKNOWN = 0  # a digest slot that says nothing; real digests are never 0
STORED_UNKNOWN = np.uint64(2**64 - 1)  # how UNKNOWN is stored (0 means "zero granule")
WRITE_CHUNK = 1 << 17  # digest slots per write: 1 MiB
STATE_CLEAN = "clean"
STATE_UPDATING = "updating"
HASH_CHUNK = 8 << 20


class ManifestError(BlockMirrorError):
    """The manifest is missing, corrupt or belongs to another copy."""


def manifest_path(copy_path: str) -> str:
    return copy_path + SUFFIX


def digest(block: bytes | memoryview) -> int:
    """The granule digest: xxh3-64, never UNKNOWN."""
    return xxhash.xxh3_64_intdigest(block) or 1


def zero_digest(length: int) -> int:
    return digest(bytes(length))


@dataclass
class Manifest:
    """An open manifest: header fields plus the digest array (memory-mapped)."""

    path: str
    granularity: int
    image_size: int
    series: str
    generation: int
    state: str
    source: str
    digests: np.ndarray  # uint64, one per granule, in memory; written back with pwrite
    publish_to: str | None = None  # a new manifest's final name, taken at commit

    @property
    def change_id(self) -> str:
        return f"{self.series}:{self.generation}"

    # -- creating and opening -------------------------------------------------

    @classmethod
    def create(cls, path: str, *, granularity: int, image_size: int, source: str) -> Manifest:
        """A new manifest for a new copy: every granule taken for zeros (a new
        copy starts as one hole) until :meth:`record` says otherwise. It is
        built under a temporary name and takes PATH only at :meth:`commit`,
        so no half-made manifest can ever vouch for a copy."""
        granules = -(-image_size // granularity)
        tmp = path + ".tmp"
        # 0600 and never through a link: whoever can edit the digests can make
        # a hash resync skip blocks (the same trust rule as the sidecar, I5).
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        with os.fdopen(fd, "wb") as f:
            f.truncate(HEADER_BYTES + 8 * granules)  # holes: stored zeros
        digests = np.full(granules, zero_digest(granularity), dtype="<u8")
        if granules and image_size % granularity:
            digests[-1] = zero_digest(image_size % granularity)
        m = cls(path=tmp, granularity=granularity, image_size=image_size, series="",
                generation=0, state=STATE_UPDATING, source=source, digests=digests)
        m.publish_to = path
        m.write_header()
        return m

    @classmethod
    def open(cls, path: str) -> Manifest:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ManifestError(f"no manifest at {path}") from None
        except OSError as e:
            raise ManifestError(f"manifest {path} cannot be opened: {e.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) or st.st_uid not in (0, os.geteuid()):
                raise ManifestError(
                    f"manifest {path} is writable by others or owned by uid {st.st_uid}: its "
                    "digests could make a resync skip blocks, so it is not trusted"
                )
            header = f.read(HEADER_BYTES)
            size = st.st_size
        if not header.startswith(MAGIC):
            raise ManifestError(f"{path} is not a blockmirror manifest")
        try:
            body, check = header[len(MAGIC):].rstrip(b" \n\0").rsplit(b"\n", 1)
            if xxhash.xxh3_64_hexdigest(body) != check.decode():
                raise ValueError("checksum")
            meta = json.loads(body)
            granularity = int(meta["granularity"])
            image_size = int(meta["image_size"])
        except (ValueError, KeyError, UnicodeDecodeError):
            raise ManifestError(f"manifest {path} has a corrupt header") from None
        granules = -(-image_size // granularity) if granularity > 0 else -1
        if granules < 0 or size != HEADER_BYTES + 8 * granules:
            raise ManifestError(f"manifest {path} is truncated or has the wrong size")
        with open(path, "rb") as f:
            f.seek(HEADER_BYTES)
            stored = np.frombuffer(f.read(8 * granules), dtype="<u8")
        if len(stored) != granules:
            raise ManifestError(f"manifest {path} is truncated")
        digests = _decode(stored, granularity)
        m = cls(path=path, granularity=granularity, image_size=image_size,
                series=str(meta["series"]), generation=int(meta["generation"]),
                state=str(meta["state"]), source=str(meta.get("source", "")), digests=digests)
        if m.state == STATE_CLEAN and meta.get("digests_xxh3") != m.digests_checksum():
            raise ManifestError(f"manifest {path} digests are corrupt (checksum mismatch)")
        return m

    def digests_checksum(self) -> str:
        return xxhash.xxh3_64_hexdigest(np.ascontiguousarray(self.digests).tobytes())

    def write_header(self) -> None:
        meta: dict[str, Any] = {
            "granularity": self.granularity, "image_size": self.image_size,
            "series": self.series, "generation": self.generation, "state": self.state,
            "source": self.source,
        }
        if self.state == STATE_CLEAN:
            meta["digests_xxh3"] = self.digests_checksum()
        body = json.dumps(meta, sort_keys=True).encode()
        header = MAGIC + body + b"\n" + xxhash.xxh3_64_hexdigest(body).encode() + b"\n"
        if len(header) > HEADER_BYTES:
            raise ManifestError("manifest header too long (source path?)")
        with open(self.path, "r+b") as f:
            f.write(header.ljust(HEADER_BYTES, b" "))
            f.flush()
            os.fsync(f.fileno())

    def write_digests(self, first: int = 0, last: int | None = None, *,
                      skip_zeros: bool = False) -> None:
        """Write digest slots [FIRST, LAST) back to the file and fsync. With
        SKIP_ZEROS (a new file, all holes) chunks of zero granules are left
        unwritten, so they stay holes."""
        last = len(self.digests) if last is None else last
        fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            for start in range(first, last, WRITE_CHUNK):
                stored = _encode(self.digests[start:min(last, start + WRITE_CHUNK)],
                                 self.granularity)
                if skip_zeros and not stored.any():
                    continue
                data = stored.tobytes()
                offset = HEADER_BYTES + 8 * start
                while data:
                    n = os.pwrite(fd, data, offset)
                    data, offset = data[n:], offset + n
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Nothing is held open between calls; kept for symmetry."""

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
        with open(self.path, "r+b") as f:
            f.truncate(HEADER_BYTES + 8 * granules)
        self.write_digests(max(0, keep - 1))

    def begin_update(self) -> None:
        """Say, durably, that the copy is about to change."""
        if self.state != STATE_UPDATING:
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
        chunks in flight: on NFS each read pays a round trip."""
        g = self.granularity
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
               recorded: Iterable[tuple[int, int]] | None = None) -> None:
        """The copy is now exactly the source at change id SERIES:GENERATION.

        Writes back the digests under RECORDED (byte extents; all of them
        when None), then the header; a new manifest then takes its name."""
        if self.publish_to is not None:
            self.write_digests(skip_zeros=True)
        elif recorded is None:
            self.write_digests()
        else:
            for first, last in self._granule_ranges(recorded):
                self.write_digests(first, last)
        self.series, self.generation, self.state = series, generation, STATE_CLEAN
        self.write_header()
        if self.publish_to is not None:
            os.replace(self.path, self.publish_to)
            self.path, self.publish_to = self.publish_to, None
            folder = os.open(os.path.dirname(os.path.abspath(self.path)) or ".",
                             os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)

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
    parts = []
    while length > 0:
        chunk = os.pread(fd, length, offset)
        if not chunk:
            parts.append(bytes(length))  # past the end reads as zeros
            break
        parts.append(chunk)
        length -= len(chunk)
        offset += len(chunk)
    return b"".join(parts)
