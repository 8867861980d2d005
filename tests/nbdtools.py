"""NBD helpers for the tests: an export of an image on a private unix socket
(nbdkit with blockmirror's plugin started directly, or ``blockmirror serve``)
and a small synchronous NBD client.

The client speaks just enough of the protocol (NetworkBlockDevice/nbd
doc/proto.md) for the tests: fixed-newstyle handshake, NBD_OPT_GO, simple
replies, and READ / WRITE (FUA) / FLUSH / TRIM / WRITE_ZEROES / DISC. It runs
under the project's Python, which cannot load Debian's python3-libnbd.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import blockmirror
from blockmirror import Tracker

# -- finding the tools ------------------------------------------------------------


def plugin_so() -> str | None:
    """The built nbdkit plugin beside the package, or None."""
    found = glob.glob(os.path.join(os.path.dirname(blockmirror.__file__), "_nbdkit_plugin*.so"))
    return found[0] if found else None


def require(*tools: str) -> None:
    """Skip the test unless every one of TOOLS is on PATH."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")


def require_plugin() -> str:
    """The plugin's path; skips the test when nbdkit or the plugin is missing."""
    require("nbdkit")
    path = plugin_so()
    if path is None:
        pytest.skip("blockmirror's nbdkit plugin is not built (needs nbdkit-plugin-dev)")
    return path


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")


def uri_of(sock: str | os.PathLike[str]) -> str:
    return f"nbd+unix:///?socket={os.fspath(sock)}"


# -- an export ----------------------------------------------------------------------


class Export:
    """One nbdkit process serving IMAGE on a private unix socket."""

    def __init__(self, image: Path, sock: Path, log: Path, args: list[str]) -> None:
        self.image, self.socket, self.log = image, sock, log
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(
                ["nbdkit", "--foreground", "--exit-with-parent", "-U", str(sock), *args],
                stdout=err, stderr=err)
        try:
            self._wait_ready()
        except BaseException:
            self.kill()
            raise

    @property
    def uri(self) -> str:
        return uri_of(self.socket)

    def _wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nbdkit exited {self.proc.returncode}: {self.stderr()}")
            if self.socket.exists():
                with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(self.socket))
                    return
            time.sleep(0.01)
        raise RuntimeError(f"nbdkit did not listen on {self.socket} in {timeout} s")

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM (nbdkit drains and the plugin closes the sidecar clean);
        its exit code. Idempotent."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()

    def kill(self) -> None:
        """SIGKILL: the plugin gets no chance to close anything."""
        self.proc.kill()
        self.proc.wait()


class Exports:
    """Starts exports in WORKDIR and stops every one of them on close."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[Export] = []

    def start(self, image: Path, *, readonly: bool = False, track: bool = True,
              plugin: bool = True) -> Export:
        """Serve IMAGE through blockmirror's plugin (creating its sidecar
        first, as ``serve`` does, when TRACK), or through ``nbdkit file``
        when not PLUGIN."""
        n = len(self.started)
        if plugin:
            so = require_plugin()
            if track and not os.path.exists(str(image) + ".cbt"):
                Tracker.create(image).close()
            args = [so, f"image={os.path.abspath(image)}"]
            if readonly:
                args.append("readonly=true")
        else:
            require("nbdkit")
            args = ["file", f"file={os.path.abspath(image)}"]
        if readonly:
            args.insert(0, "-r")
        export = Export(image, self.workdir / f"nbd{n}.sock", self.workdir / f"nbdkit{n}.log",
                        args)
        self.started.append(export)
        return export

    def close(self) -> None:
        for export in self.started:
            export.stop()

    def __enter__(self) -> Exports:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- a small NBD client --------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
OPT_GO, REP_ACK, REP_INFO, INFO_EXPORT = 7, 1, 3, 0
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_ZERO = 0, 1, 2, 3, 4, 6
CMD_FLAG_FUA, CMD_FLAG_NO_HOLE = 1, 2
TFLAG_READ_ONLY, TFLAG_SEND_FUA, TFLAG_SEND_TRIM = 1 << 1, 1 << 3, 1 << 5
TFLAG_SEND_WRITE_ZEROES, TFLAG_CAN_MULTI_CONN = 1 << 6, 1 << 8


class NbdError(OSError):
    """The server answered a request with an error (errno in .errno)."""


class NbdClient:
    """One connection, one request in flight at a time."""

    def __init__(self, sock: str | os.PathLike[str], timeout: float = 60.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(os.fspath(sock))
        self._handle = 0
        self.size, self.flags = self._handshake()

    def _recv(self, n: int) -> bytes:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            k = self.sock.recv_into(view[got:])
            if k == 0:
                raise ConnectionError("NBD server closed the connection")
            got += k
        return bytes(buf)

    def _handshake(self) -> tuple[int, int]:
        magic, opt, hflags = struct.unpack(">QQH", self._recv(18))
        if (magic, opt) != (NBDMAGIC, IHAVEOPT) or not hflags & FLAG_FIXED_NEWSTYLE:
            raise ConnectionError("not a fixed-newstyle NBD server")
        self.sock.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | (hflags & FLAG_NO_ZEROES)))
        # NBD_OPT_GO, default export name, no extra info requested
        self.sock.sendall(struct.pack(">QIIIH", IHAVEOPT, OPT_GO, 6, 0, 0))
        size = tflags = None
        while True:
            magic, _opt, rtype, length = struct.unpack(">QIII", self._recv(20))
            data = self._recv(length)
            if magic != REPLY_MAGIC:
                raise ConnectionError("bad option reply magic")
            if rtype & (1 << 31):
                raise ConnectionError(f"NBD_OPT_GO refused: {data.decode(errors='replace')}")
            if rtype == REP_INFO and struct.unpack(">H", data[:2])[0] == INFO_EXPORT:
                size, tflags = struct.unpack(">QH", data[2:12])
            if rtype == REP_ACK:
                break
        if size is None or tflags is None:
            raise ConnectionError("server sent no export info")
        return size, tflags

    def _request(self, cmd: int, offset: int, length: int, flags: int = 0,
                 data: bytes = b"") -> bytes:
        self._handle += 1
        self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, self._handle,
                                      offset, length) + data)
        magic, error, handle = struct.unpack(">IIQ", self._recv(16))
        if magic != SIMPLE_REPLY_MAGIC or handle != self._handle:
            raise ConnectionError("bad reply from the NBD server")
        if error:
            raise NbdError(error, f"NBD command {cmd} at {offset}+{length}: {os.strerror(error)}")
        return self._recv(length) if cmd == CMD_READ else b""

    def pread(self, length: int, offset: int) -> bytes:
        return self._request(CMD_READ, offset, length)

    def pwrite(self, data: bytes, offset: int, *, fua: bool = False) -> None:
        self._request(CMD_WRITE, offset, len(data), CMD_FLAG_FUA if fua else 0, data)

    def trim(self, length: int, offset: int) -> None:
        self._request(CMD_TRIM, offset, length)

    def zero(self, length: int, offset: int, *, may_trim: bool = True) -> None:
        self._request(CMD_ZERO, offset, length, 0 if may_trim else CMD_FLAG_NO_HOLE)

    def flush(self) -> None:
        self._request(CMD_FLUSH, 0, 0)

    def close(self) -> None:
        """Soft disconnect (NBD_CMD_DISC), then close the socket."""
        with contextlib.suppress(OSError):
            self._handle += 1
            self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC,
                                          self._handle, 0, 0))
        self.sock.close()

    def __enter__(self) -> NbdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def connected(export: Export) -> Iterator[NbdClient]:
    client = NbdClient(export.socket)
    try:
        yield client
    finally:
        client.close()


# -- mounts ------------------------------------------------------------------------


def unmount(path: Path) -> None:
    """umount PATH, retrying while it is still busy (a loop device detaching
    lets go of its file a moment later), lazily as the last resort."""
    for _ in range(50):
        if subprocess.run(["umount", str(path)], capture_output=True).returncode == 0:
            return
        if not os.path.ismount(path):
            return
        time.sleep(0.1)
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


# -- blockmirror serve ---------------------------------------------------------------


@contextlib.contextmanager
def served(image: Path, workdir: Path, *options: str) -> Iterator[list[str]]:
    """``blockmirror serve IMAGE --foreground --socket WORKDIR/serve.sock
    OPTIONS`` running; yields what it announced on stdout (the URI, then
    with --fuse the file's path). Stopped with SIGTERM at the end, which
    must end it cleanly (exit 0)."""
    sock = workdir / "serve.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "blockmirror", "serve", str(image), "--foreground",
         "--socket", str(sock), *options],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    try:
        announced = [proc.stdout.readline().strip()
                     for _ in range(2 if "--fuse" in options else 1)]
        if announced[0] == uri_of(sock):
            yield announced
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert announced[0] == uri_of(sock), f"serve announced {announced}: {err}"
    assert proc.returncode == 0, f"serve exited {proc.returncode}: {err}"
