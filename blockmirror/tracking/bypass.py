"""Catching writers that bypass the tracker (issue 13, item 8).

A sidecar only sees writes that go through blockmirror's write path. A
program that writes the image directly (``qemu-io -f raw IMG``, ``dd``, an
editor) leaves no dirty bit, and a sync would commit a copy that misses its
writes. Where the copier may use fanotify (root: CAP_SYS_ADMIN), the kernel
reports every modification of the image with the writer's pid; a write from a
process that does not hold the image's sidecar mapped (every tracked writer
maps it for as long as it has the image open) is a bypassing write. A writer
that writes and exits before its event is read can no longer be looked at,
so the sidecar is watched too: every process that opened the sidecar since
the watch began counts as tracked (a tracked writer opens it before its
first write, and the kernel queues the two events in that order).

What is caught and what is not:
- caught: write(2), pwrite(2), truncate and fallocate from any process on
  this host, through any path or hard link to the image;
- not caught: writes through a shared memory mapping of the image (the
  kernel raises no modify event for them), writes from another host (NFS),
  and, without root, anything this watch would see (the sync's other checks
  still catch growth past the tracked size and an mtime past the last
  tracked write);
- a process that opened the sidecar (even only to read it, as ``track
  status`` does) and then writes the image directly is taken for a tracked
  writer;
- a tracked writer that opened the sidecar before the sync began and wrote
  and exited before its event was read is taken for a bypassing one: the
  sync then fails safe (not converged, source untouched).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import select
import struct
import threading
from dataclasses import dataclass

from blockmirror import files

_FAN_CLASS_NOTIF = 0x0
_FAN_CLOEXEC = 0x1
_FAN_NONBLOCK = 0x2
_FAN_MODIFY = 0x2
_FAN_OPEN = 0x20
_FAN_Q_OVERFLOW = 0x4000
_FAN_MARK_ADD = 0x1
_AT_FDCWD = -100
# struct fanotify_event_metadata: event_len, vers, reserved, metadata_len,
# mask, fd, pid.
_EVENT = struct.Struct("=IBBHQii")


@dataclass(frozen=True)
class BypassingWriter:
    pid: int
    command: str  # /proc/PID/comm, or "?" once the process is gone


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
    libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int,
                                   ctypes.c_char_p]
    return libc


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


class BypassWatch:
    """Watches one image for modifications by processes that are not
    tracked writers of it, from :meth:`start` until :meth:`close`."""

    def __init__(self, fan_fd: int, sidecar: str) -> None:
        self._fd = fan_fd
        st = os.stat(sidecar)
        self._sidecar = (st.st_dev, st.st_ino)
        self._tracked: set[int] = {os.getpid()}  # the copier never writes the source
        self._found: dict[int, BypassingWriter] = {}
        self._overflowed = False
        self._lock = threading.Lock()
        # close() wakes the reader through this pipe: it waits on the events
        # without a timeout, so ending a sync costs no polling interval.
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread = threading.Thread(target=self._run, name="blockmirror-bypass",
                                        daemon=True)
        self._thread.start()

    @classmethod
    def start(cls, image: str, sidecar: str) -> BypassWatch | None:
        """A watch on IMAGE, or None where fanotify is not allowed (not root)
        or not supported by the filesystem."""
        try:
            libc = _libc()
        except OSError:
            return None
        fd = libc.fanotify_init(_FAN_CLASS_NOTIF | _FAN_CLOEXEC | _FAN_NONBLOCK,
                                os.O_RDONLY | os.O_CLOEXEC | os.O_LARGEFILE)
        if fd < 0:
            return None  # EPERM without CAP_SYS_ADMIN, ENOSYS
        if (libc.fanotify_mark(fd, _FAN_MARK_ADD, _FAN_MODIFY, _AT_FDCWD, os.fsencode(image)) < 0
                or libc.fanotify_mark(fd, _FAN_MARK_ADD, _FAN_OPEN, _AT_FDCWD,
                                      os.fsencode(sidecar)) < 0):
            os.close(fd)
            return None
        return cls(fd, sidecar)

    def _run(self) -> None:
        while True:
            ready, _, _ = select.select([self._fd, self._wake_r], [], [])
            if self._wake_r in ready:
                return
            self._drain()

    def _drain(self) -> None:
        while True:
            try:
                data = os.read(self._fd, 64 * _EVENT.size)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                return
            offset = 0
            while offset + _EVENT.size <= len(data):
                length, _, _, _, mask, event_fd, pid = _EVENT.unpack_from(data, offset)
                if event_fd >= 0:
                    os.close(event_fd)  # notification mode hands us an fd per event
                self._judge(mask, pid)
                offset += max(length, _EVENT.size)

    def _judge(self, mask: int, pid: int) -> None:
        if mask & _FAN_Q_OVERFLOW:
            with self._lock:
                self._overflowed = True
            return
        if mask & _FAN_OPEN:  # only the sidecar is marked for opens
            self._tracked.add(pid)
            return
        if pid in self._tracked:
            return
        mapped = files.process_maps(pid, *self._sidecar)
        if mapped:
            self._tracked.add(pid)
            return
        with self._lock:
            self._found.setdefault(pid, BypassingWriter(pid, _command(pid)))

    def bypassing_writers(self) -> list[BypassingWriter]:
        """The processes seen modifying the image without the tracker so
        far (events up to now are read first). An overflowed event queue
        counts as one unknown writer: nothing can be vouched for then."""
        self._drain()
        with self._lock:
            found = list(self._found.values())
            if self._overflowed:
                found.append(BypassingWriter(0, "unknown (fanotify queue overflow)"))
        return found

    def close(self) -> None:
        os.write(self._wake_w, b"x")
        self._thread.join()
        for fd in (self._fd, self._wake_r, self._wake_w):
            os.close(fd)
