"""The manifest of a copy held in an NBD export or an NFS file, kept beside
the source.

The remote side holds only the image, so what an incremental sync needs to
know about the export (or NFS file: "export" below) lives in
``SRC.bm-remote/`` (a folder of ours, 0700), one file per export:
``<sha256 of the export's display URI>.manifest`` (0600). The display URI
never carries user info, and only its hash names the file; the file itself
records the display URI, never the one with credentials.

A manifest says: the export (display URI) and its size, the source's size,
the change id of the source the export was exact at, and the digest of each
granule of the export as it was at that instant (a
:class:`~blockmirror.migration.digests.DigestTable` with no unknown
granules). The next sync checks the export against it cheaply — its size,
and a few granules chosen at random *at check time* (some holding data,
some anywhere) read back and hashed — so an export that was overwritten,
restored or replaced by another is caught unless the change spared every
sampled granule. What a sample cannot catch (a small edit behind our back)
is the price of not reading the whole export; ``--force`` takes a full copy.

A manifest is never updated in place: the sync removes it (durably) before
the first byte goes into the export, and writes a new one, under a
temporary name then renamed, only after the export's final flush. A sync
that dies in between leaves no manifest, so the next one is a full copy.

Layout: ``BMREMOTE 1\\n``, a JSON line, a line with the xxh3-64 of that
JSON, then the body (the table's data granule indices, then their digests,
little-endian uint64) whose length and xxh3-64 the JSON holds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import xxhash

from blockmirror import files
from blockmirror.migration import digests as dg
from blockmirror.migration.digests import UNKNOWN, DigestTable
from blockmirror.migration.manifest import ManifestError

if TYPE_CHECKING:
    import numpy as np
else:  # numpy on first use (see blockmirror._numpy)
    from blockmirror._numpy import np

MAGIC = b"BMREMOTE 1\n"
FOLDER_SUFFIX = ".bm-remote"
FILE_SUFFIX = ".manifest"
TMP_SUFFIX = ".tmp"
DATA_SAMPLES = 12  # granules holding data, read back at random
ANY_SAMPLES = 4  # granules anywhere in the image (holes too)


class SampledExport(Protocol):
    """What the sample check and the read-back need of an export (NbdExport
    and NfsFile have it)."""

    size: int

    def pread(self, conn: int, nbytes: int, offset: int) -> bytes: ...


def manifest_location(source: str, export_display: str) -> tuple[str, str]:
    """(folder, file name) of the manifest of SOURCE's copy in the export
    named EXPORT_DISPLAY (a URI without user info)."""
    name = hashlib.sha256(export_display.encode()).hexdigest()[:32] + FILE_SUFFIX
    return os.path.abspath(source) + FOLDER_SUFFIX, name


def _open_folder(folder: str, *, create: bool) -> int:
    """Our folder, opened without following a link, or -1 when it does not
    exist (and CREATE is false). Refused when someone else could write it:
    whoever can edit a manifest can make a sync skip blocks (I5)."""
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder, 0o700)
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return -1
    except OSError as e:
        raise ManifestError(f"manifest folder {folder} cannot be opened: {e.strerror}") from None
    st = os.fstat(fd)
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) or st.st_uid not in (0, os.geteuid()):
        os.close(fd)
        raise ManifestError(f"manifest folder {folder} is writable by others or owned by "
                            f"uid {st.st_uid}: not trusted")
    return fd


@dataclass
class RemoteManifest:
    """What the export named EXPORT held at change id SERIES:GENERATION."""

    export: str
    export_size: int
    image_size: int
    granularity: int
    series: str
    generation: int
    table: DigestTable

    @property
    def change_id(self) -> str:
        return f"{self.series}:{self.generation}"

    # -- writing ----------------------------------------------------------------

    def to_bytes(self) -> bytes:
        table = self.table
        if len(table.unknown):
            raise ValueError("a remote manifest must know every granule")
        body = (np.ascontiguousarray(table.keys).astype("<u8").tobytes()
                + np.ascontiguousarray(table.values).astype("<u8").tobytes())
        meta = {"format": 1, "export": self.export, "export_size": self.export_size,
                "image_size": self.image_size, "granularity": self.granularity,
                "series": self.series, "generation": self.generation,
                "data_granules": len(table.keys), "body_length": len(body),
                "body_xxh3": xxhash.xxh3_64_hexdigest(body)}
        text = json.dumps(meta, sort_keys=True).encode()
        return MAGIC + text + b"\n" + xxhash.xxh3_64_hexdigest(text).encode() + b"\n" + body

    def save(self, folder: str, name: str) -> None:
        """Write under a temporary name (exclusive, 0600, never through a
        link), fsync, rename into place, fsync the folder."""
        dfd = _open_folder(folder, create=True)
        assert dfd >= 0
        tmp = name + TMP_SUFFIX
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dfd)  # a dead run's leftover
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600, dir_fd=dfd)
            try:
                data = memoryview(self.to_bytes())
                while data:
                    data = data[os.write(fd, data):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            os.fsync(dfd)
        finally:
            os.close(dfd)

    # -- reading ----------------------------------------------------------------

    @classmethod
    def load(cls, folder: str, name: str) -> RemoteManifest:
        """The manifest, checked; ManifestError (with the reason) when it is
        missing, not ours, corrupt or malformed."""
        path = os.path.join(folder, name)
        dfd = _open_folder(folder, create=False)
        if dfd < 0:
            raise ManifestError(f"no manifest at {path}")
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                         dir_fd=dfd)
        except FileNotFoundError:
            raise ManifestError(f"no manifest at {path}") from None
        except OSError as e:
            raise ManifestError(f"manifest {path} cannot be opened: {e.strerror}") from None
        finally:
            os.close(dfd)
        try:
            st = os.fstat(fd)
            if (not stat.S_ISREG(st.st_mode) or st.st_nlink != 1
                    or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
                    or st.st_uid not in (0, os.geteuid())):
                raise ManifestError(f"manifest {path} is not a private regular file of ours")
            raw = files.pread_full(fd, st.st_size, 0)
        finally:
            os.close(fd)
        return cls.from_bytes(raw, path)

    @classmethod
    def from_bytes(cls, raw: bytes, path: str) -> RemoteManifest:
        corrupt = ManifestError(f"manifest {path} is corrupt")
        if not raw.startswith(MAGIC):
            raise corrupt
        try:
            text, check, body = raw[len(MAGIC):].split(b"\n", 2)
            if xxhash.xxh3_64_hexdigest(text) != check.decode():
                raise ValueError("header checksum")
            meta: dict[str, Any] = json.loads(text)
            n = int(meta["data_granules"])
            if (len(body) != int(meta["body_length"]) or len(body) != 16 * n
                    or xxhash.xxh3_64_hexdigest(body) != meta["body_xxh3"]):
                raise ValueError("body")
            table = DigestTable(int(meta["granularity"]), int(meta["image_size"]))
            words = np.frombuffer(body, dtype="<u8")
            keys, values = words[:n].astype(np.int64), words[n:].astype(np.uint64)
            m = cls(str(meta["export"]), int(meta["export_size"]), table.size,
                    table.granularity, str(meta["series"]), int(meta["generation"]), table)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise corrupt from None
        if (m.granularity <= 0 or m.image_size < 0 or not m.series
                or (n and (keys[0] < 0 or keys[-1] >= table.granules))
                or not bool(np.all(np.diff(keys) > 0)) or bool(np.any(values == UNKNOWN))):
            raise corrupt
        table.keys, table.values = keys, values
        return m


def invalidate(folder: str, name: str) -> bool:
    """Remove the manifest, durably (before the export is written: a sync
    that dies midway must leave none). True when there was one."""
    dfd = _open_folder(folder, create=False)
    if dfd < 0:
        return False
    try:
        try:
            os.unlink(name, dir_fd=dfd)
        except FileNotFoundError:
            return False
        os.fsync(dfd)
        return True
    finally:
        os.close(dfd)


def sample_granules(table: DigestTable, rng: random.Random) -> list[int]:
    """Granules to read back: up to DATA_SAMPLES holding data, ANY_SAMPLES
    anywhere, chosen now (an overwrite cannot know which will be read)."""
    picked: set[int] = set()
    if len(table.keys):
        picked.update(int(k) for k in rng.sample(table.keys.tolist(),
                                                  min(DATA_SAMPLES, len(table.keys))))
    if table.granules:
        picked.update(rng.randrange(table.granules) for _ in range(ANY_SAMPLES))
    return sorted(picked)


def sample_mismatch(manifest: RemoteManifest, export: SampledExport,
                    rng: random.Random | None = None) -> str | None:
    """Why the export is not what MANIFEST says it holds, or None when its
    size and every sampled granule (read back, hashed) agree."""
    if export.size != manifest.export_size:
        return (f"the export's size changed since the last sync "
                f"({manifest.export_size} -> {export.size} bytes)")
    table, g = manifest.table, manifest.granularity
    keys = sample_granules(table, rng or random.SystemRandom())
    want = table.get(np.array(keys, dtype=np.int64))
    for key, expected in zip(keys, want.tolist(), strict=True):
        offset = key * g
        length = min(g, manifest.image_size - offset)
        if dg.digest(export.pread(0, length, offset)) != expected:
            return (f"the export does not hold what the last sync left there (granule at "
                    f"byte {offset} differs): it was written behind blockmirror's back")
    return None


def read_back(table: DigestTable, export: SampledExport, chunk: int = 4 << 20) -> None:
    """Digest TABLE's unknown granules from the export (over connection 0):
    the granules no pass hashed, read back after the export's flush."""
    g = table.granularity
    step = max(g, chunk // g * g)
    for offset, length in dg.byte_extents(table.unknown, g, table.size):
        for start in range(offset, offset + length, step):
            n = min(step, offset + length - start)
            data = memoryview(export.pread(0, n, start))
            first = start // g
            keys = np.arange(first, first + -(-n // g), dtype=np.int64)
            values = np.array([dg.digest(data[i * g:(i + 1) * g]) for i in range(len(keys))],
                              dtype=np.uint64)
            table.put(keys, values)
