"""A destination that is slow for everyone who writes to it (issue 10).

The copier's own ``--bwlimit`` caps only its passes; mirrored writes bypass
it, as a guest's writes would on a real slower disk or NFS server. To model
the destination's bandwidth honestly, the copy goes to an ext4 filesystem
on a loop device whose writes the kernel throttles:

- the cgroup v1 ``blkio`` throttle (``blkio.throttle.write_bps_device`` of
  the root cgroup, so writeback by the kernel's flusher threads is held to
  it as much as the copier's and the writers' own I/O);
- the loop device's writeback limits (``strict_limit`` and ``max_bytes`` of
  its backing-device info), so the page cache absorbs only a few MiB before
  writers into that filesystem wait for writeback: without them a machine
  with 24 GiB of RAM would hide a slow disk behind gigabytes of dirty pages.

Root only. :func:`skip_reason` says why it cannot run here, or None.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

BLKIO = Path("/sys/fs/cgroup/blkio/blkio.throttle.write_bps_device")
DIRTY_BYTES = 16 << 20  # the page cache this filesystem may hold dirty


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (loop device, mount, blkio throttle)"
    if not BLKIO.exists():
        return "no cgroup v1 blkio throttle at /sys/fs/cgroup/blkio"
    for tool in ("losetup", "mkfs.ext4", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


@contextlib.contextmanager
def slow_disk(bytes_per_s: int, size: int = 4 << 30,
              parent: Path | None = None) -> Iterator[Path]:
    """A mounted ext4 folder of SIZE bytes whose writes run at BYTES_PER_S;
    everything is undone on exit (even after a failure inside)."""
    reason = skip_reason()
    if reason is not None:
        raise RuntimeError(f"slow disk unavailable: {reason}")
    work = Path(tempfile.mkdtemp(prefix="bm-slowdisk-", dir=parent))
    backing, mnt = work / "backing", work / "mnt"
    mnt.mkdir()
    with open(backing, "wb") as f:
        f.truncate(size)
    with contextlib.ExitStack() as undo:
        undo.callback(shutil.rmtree, work, ignore_errors=True)
        loop = _run("losetup", "--find", "--show", "--direct-io=on", str(backing))
        undo.callback(subprocess.run, ["losetup", "-d", loop], check=False)
        _run("mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", loop)
        _run("mount", loop, str(mnt))
        undo.callback(subprocess.run, ["umount", "-l", str(mnt)], check=False)
        dev = _run("lsblk", "-no", "MAJ:MIN", loop).replace(" ", "")
        bdi = Path("/sys/class/bdi") / dev
        (bdi / "strict_limit").write_text("1")
        (bdi / "max_bytes").write_text(str(DIRTY_BYTES))
        BLKIO.write_text(f"{dev} {int(bytes_per_s)}")
        undo.callback(BLKIO.write_text, f"{dev} 0")
        yield mnt
