"""An NFS stand-in: a FUSE passthrough filesystem with per-request latency.

No kernel NFS client exists on the test machines, so this plays its part in
the ways that matter to a copier:

- it does not implement lseek (libfuse 2 has no SEEK_DATA/SEEK_HOLE), so the
  kernel reports every file as all data, as NFS before 4.2 does;
- it implements neither copy_file_range nor fallocate, so nothing is done
  server-side and punching a hole fails with EOPNOTSUPP, as on NFSv3;
- every read and write request sleeps ``latency`` seconds first, like a
  network round trip, and runs on its own thread (``nothreads=False``), so
  requests a client keeps in flight at once overlap;
- it is mounted with ``direct_io`` by default, so nothing is served from the
  client's page cache and two runs over the same file cost the same.

Requests are split at 128 KiB (``max_read``, ``big_writes``), as an NFS
client splits at its rsize/wsize.

Use from tests::

    with nfs_standin.mounted(backing_dir, latency=0.003) as fs:
        path = fs.mountpoint / "image"
        ...
        fs.stats()   # requests served, and the peak in flight since last asked

or run it by hand: ``python tests/nfs_standin.py BACKING MOUNTPOINT --latency 0.003``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:  # fusepy raises OSError at import when libfuse.so.2 is missing
    import fuse
except (ImportError, OSError) as exc:  # pragma: no cover - depends on the machine
    fuse = None
    _FUSE_IMPORT_ERROR: str | None = f"fusepy/libfuse unavailable: {exc}"
else:
    _FUSE_IMPORT_ERROR = None

MAX_REQUEST = 128 * 1024
STATS_NAME = ".standin-stats"
"""A virtual file at the mount's root: reading it returns the counters."""

_STATS_FH = 2**32 - 1  # the stats file's handle: no real fd is this large
_STAT_KEYS = ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_blocks")
_TIME_KEYS = ("st_atime", "st_mtime", "st_ctime")


def skip_reason() -> str | None:
    """Why the stand-in cannot be mounted here, or None if it can."""
    if _FUSE_IMPORT_ERROR is not None:
        return _FUSE_IMPORT_ERROR
    if not sys.platform.startswith("linux"):
        return "FUSE stand-in needs Linux"
    if os.geteuid() != 0:
        return "FUSE stand-in needs root"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if shutil.which("fusermount") is None:
        return "fusermount is missing (Debian package fuse)"
    return None


if fuse is not None:

    class LatencyPassthrough(fuse.Operations):  # type: ignore[misc]
        """Passes every call through to files under ROOT; reads and writes
        first sleep LATENCY seconds."""

        use_ns = True

        def __init__(self, root: str, latency: float) -> None:
            self.root = root
            self.latency = latency
            self._lock = threading.Lock()
            self._inflight = 0
            self._peak = 0
            self._counts = {"reads": 0, "writes": 0, "read_bytes": 0, "write_bytes": 0}

        def _full(self, path: str) -> str:
            return os.path.join(self.root, path.lstrip("/"))

        @contextlib.contextmanager
        def _request(self, kind: str, nbytes: int) -> Iterator[None]:
            with self._lock:
                self._inflight += 1
                self._peak = max(self._peak, self._inflight)
                self._counts[kind + "s"] += 1
                self._counts[kind + "_bytes"] += nbytes
            try:
                if self.latency > 0:
                    time.sleep(self.latency)  # releases the GIL: requests overlap
                yield
            finally:
                with self._lock:
                    self._inflight -= 1

        def _stats_blob(self) -> bytes:
            with self._lock:
                blob = dict(self._counts, peak_inflight=self._peak)
                self._peak = self._inflight
            return json.dumps(blob).encode().ljust(4096)

        # -- metadata ---------------------------------------------------------

        def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
            if path == "/" + STATS_NAME:
                now = time.time_ns()
                return {
                    "st_mode": 0o100444,
                    "st_nlink": 1,
                    "st_size": 4096,
                    "st_atime": now,
                    "st_mtime": now,
                    "st_ctime": now,
                }
            st = os.fstat(fh) if fh is not None else os.lstat(self._full(path))
            attrs = {key: getattr(st, key) for key in _STAT_KEYS}
            attrs.update({key: getattr(st, key + "_ns") for key in _TIME_KEYS})
            return attrs

        def access(self, path: str, amode: int) -> int:
            if path != "/" + STATS_NAME and not os.access(self._full(path), amode):
                raise fuse.FuseOSError(errno.EACCES)
            return 0

        def readdir(self, path: str, fh: int) -> list[str]:
            return [".", "..", *os.listdir(self._full(path))]

        def chmod(self, path: str, mode: int) -> None:
            os.chmod(self._full(path), mode)

        def chown(self, path: str, uid: int, gid: int) -> None:
            os.chown(self._full(path), uid, gid)

        def utimens(self, path: str, times: tuple[int, int] | None = None) -> None:
            os.utime(self._full(path), ns=times)

        def mkdir(self, path: str, mode: int) -> None:
            os.mkdir(self._full(path), mode)

        def rmdir(self, path: str) -> None:
            os.rmdir(self._full(path))

        def unlink(self, path: str) -> None:
            os.unlink(self._full(path))

        def rename(self, old: str, new: str) -> None:
            os.rename(self._full(old), self._full(new))

        def statfs(self, path: str) -> dict[str, int]:
            sv = os.statvfs(self._full(path))
            keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail")
            keys += ("f_ffree", "f_files", "f_flag", "f_frsize", "f_namemax")
            return {key: getattr(sv, key) for key in keys}

        # -- files --------------------------------------------------------------

        def open(self, path: str, flags: int) -> int:
            if path == "/" + STATS_NAME:
                return _STATS_FH
            return os.open(self._full(path), flags & ~os.O_CREAT)

        def create(self, path: str, mode: int, fi: Any = None) -> int:
            return os.open(self._full(path), os.O_RDWR | os.O_CREAT, mode)

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            if fh == _STATS_FH:
                return self._stats_blob()[offset : offset + size]
            with self._request("read", size):
                return os.pread(fh, size, offset)

        def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
            with self._request("write", len(data)):
                return os.pwrite(fh, data, offset)

        def truncate(self, path: str, length: int, fh: int | None = None) -> None:
            if fh is not None:
                os.ftruncate(fh, length)
            else:
                os.truncate(self._full(path), length)

        def flush(self, path: str, fh: int) -> int:
            return 0

        def fsync(self, path: str, datasync: int, fh: int) -> None:
            if fh != _STATS_FH:
                (os.fdatasync if datasync else os.fsync)(fh)

        def release(self, path: str, fh: int) -> int:
            if fh != _STATS_FH:
                os.close(fh)
            return 0


def serve(root: str, mountpoint: str, latency: float, direct_io: bool) -> None:
    """Mount and serve until unmounted (runs in the foreground)."""
    if fuse is None:
        raise RuntimeError(_FUSE_IMPORT_ERROR)
    options: dict[str, Any] = {
        "foreground": True,
        "nothreads": False,
        "big_writes": True,
        "max_read": MAX_REQUEST,
        "max_write": MAX_REQUEST,
        "fsname": "nfs-standin",
    }
    if direct_io:
        options["direct_io"] = True
    fuse.FUSE(LatencyPassthrough(root, latency), mountpoint, **options)


@dataclass
class StandIn:
    """A mounted stand-in: files under ``mountpoint`` live in ``backing``."""

    mountpoint: Path
    backing: Path
    latency: float

    def stats(self) -> dict[str, int]:
        """Requests served so far, and the most in flight at once since the
        previous call (``peak_inflight``)."""
        with open(self.mountpoint / STATS_NAME, "rb") as f:
            blob = f.read()
        counts: dict[str, int] = json.loads(blob)
        return counts


def _unmount(mountpoint: Path) -> None:
    for _ in range(50):
        if not os.path.ismount(mountpoint):
            return
        done = subprocess.run(
            ["fusermount", "-u", str(mountpoint)], capture_output=True, check=False
        )
        if done.returncode == 0:
            return
        time.sleep(0.1)  # busy: a file is still open; give it a moment
    subprocess.run(["fusermount", "-u", "-z", str(mountpoint)], capture_output=True, check=False)


@contextlib.contextmanager
def mounted(
    backing: str | os.PathLike[str],
    mountpoint: str | os.PathLike[str] | None = None,
    *,
    latency: float = 0.0,
    direct_io: bool = True,
    timeout: float = 10.0,
) -> Iterator[StandIn]:
    """Mount the stand-in over BACKING (a directory) and unmount on exit.

    The filesystem runs in a child process, so its Python threads never
    compete with the test's for the GIL. Close every file under the mount
    before leaving the block (a busy mount is detached lazily at the end).
    """
    reason = skip_reason()
    if reason is not None:
        raise RuntimeError(reason)
    backing = Path(backing)
    made_mountpoint = mountpoint is None
    mnt = Path(tempfile.mkdtemp(prefix="nfs-standin-")) if mountpoint is None else Path(mountpoint)
    cmd = [sys.executable, str(Path(__file__).resolve()), str(backing), str(mnt)]
    cmd += ["--latency", repr(latency)]
    if not direct_io:
        cmd.append("--no-direct-io")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout
        while not os.path.ismount(mnt):
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise RuntimeError(f"nfs stand-in exited with {proc.returncode}: {err.strip()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"nfs stand-in did not mount {mnt} within {timeout} s")
            time.sleep(0.02)
        yield StandIn(mountpoint=mnt, backing=backing, latency=latency)
    finally:
        _unmount(mnt)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
        if made_mountpoint:
            with contextlib.suppress(OSError):
                os.rmdir(mnt)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("backing", help="directory whose files are served")
    parser.add_argument("mountpoint")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per read/write")
    parser.add_argument("--no-direct-io", action="store_true", help="allow the page cache")
    args = parser.parse_args(argv)
    serve(args.backing, args.mountpoint, args.latency, direct_io=not args.no_direct_io)
    return 0


if __name__ == "__main__":
    sys.exit(main())
