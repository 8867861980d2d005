"""Helpers shared by the tests: images with known content, a writer process
that logs every write (and replaying that log), reading and poking bytes at
an offset, the command line in a child process, and a tiny tmpfs.

The fixtures built on these (``live_writer``, ``tmpfs``) are in conftest.py.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from blockmirror.cli.workload import DISCARD, block_payload, read_log

MiB = 1 << 20

PathLike = str | os.PathLike[str]


# -- images ---------------------------------------------------------------------


def make_data_image(path: Path, size: int, extents: int = 8, extent_size: int = 1 * MiB,
                    seed: int = 1, tracked: bool = False) -> bytes:
    """A sparse image with EXTENTS random extents; returns its full content.
    With TRACKED, a fresh sidecar is created beside it."""
    rng = random.Random(seed)
    content = bytearray(size)
    with open(path, "wb") as f:
        f.truncate(size)
        slots = size // extent_size
        for slot in sorted(rng.sample(range(slots), min(extents, slots))):
            data = rng.randbytes(extent_size)
            f.seek(slot * extent_size)
            f.write(data)
            content[slot * extent_size:(slot + 1) * extent_size] = data
    os.chmod(path, 0o600)
    if tracked:
        from blockmirror import Tracker

        Tracker.create(path).close()
    return bytes(content)


def is_sparse(path: PathLike) -> bool:
    st = os.stat(path)
    return st.st_blocks * 512 < st.st_size


def allocated_bytes(path: PathLike) -> int:
    """Bytes PATH has on disk."""
    return os.stat(path).st_blocks * 512


def nonzero_cells(content: bytes, block: int = 65536) -> int:
    """Bytes in the BLOCK-sized cells of CONTENT that hold a nonzero byte:
    what zero detection must write (and no more)."""
    return sum(block for p in range(0, len(content), block) if any(content[p:p + block]))


def read_at(path: PathLike, offset: int, n: int) -> bytes:
    """N bytes of PATH at OFFSET, read past every blockmirror layer."""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


def write_at(path: PathLike, offset: int, data: bytes) -> None:
    """Overwrite PATH at OFFSET with DATA behind blockmirror's back (untracked)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def partial_exists(folder: PathLike) -> bool:
    """Is a sync's shadow copy (``.NAME.bm-partial``) in FOLDER?"""
    return any(n.endswith(".bm-partial") for n in os.listdir(folder))


def wait_for(predicate: Callable[[], object], timeout: float = 20.0,
             what: str = "condition", every: float = 0.005) -> None:
    """Poll PREDICATE until it is true; fail the test after TIMEOUT seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


# -- child processes ------------------------------------------------------------


def run_cli(*args: object, timeout: float = 120, wrapper: tuple[str, ...] = (),
            **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """``python -m blockmirror ARGS`` to completion, output captured as text.
    WRAPPER goes in front of the interpreter (e.g. setpriv)."""
    return subprocess.run([*wrapper, sys.executable, "-m", "blockmirror", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def start_cli(*args: object, capture: bool = True) -> subprocess.Popen[str]:
    """``python -m blockmirror ARGS`` started in the background (output piped
    unless CAPTURE is false)."""
    pipe = subprocess.PIPE if capture else None
    return subprocess.Popen([sys.executable, "-m", "blockmirror", *map(str, args)],
                            stdout=pipe, stderr=pipe, text=True)


def cli_killed_at(module: str, qualname: str, *args: object) -> None:
    """``blockmirror ARGS`` in a child that SIGKILLs itself when MODULE's
    QUALNAME (a function, or Class.method) is called: a kill at one chosen
    moment of a run. Fails the test if that moment never came."""
    owner, _, name = qualname.rpartition(".")
    script = textwrap.dedent(f"""
        import importlib, os, sys
        holder = importlib.import_module({module!r})
        if {owner!r}:
            holder = getattr(holder, {owner!r})
        setattr(holder, {name!r}, lambda *a, **k: os.kill(os.getpid(), 9))
        from blockmirror.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    proc = subprocess.run([sys.executable, "-c", script, *map(str, args)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, (
        f"the run never reached {qualname}: exit {proc.returncode} {proc.stderr}")


def run_python(code: str, *args: object) -> subprocess.CompletedProcess[str]:
    """CODE in a fresh interpreter, with ARGS as sys.argv[1:]."""
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], timeout=60,
                          check=False, text=True)


def writer_dies(image: PathLike, writes: Sequence[tuple[int, int]] = (), *,
                how: str = "kill") -> None:
    """A writer process opens IMAGE (TrackedImage), makes WRITES (offset,
    length; random bytes) and dies without closing it: SIGKILL (HOW="kill")
    or ``os._exit(0)`` (HOW="exit"). Its sidecar is left unclean (I4)."""
    death = {"kill": "os.kill(os.getpid(), 9)", "exit": "os._exit(0)"}[how]
    code = ("import os, sys, blockmirror\n"
            "w = blockmirror.TrackedImage(sys.argv[1])\n"
            f"for off, n in {list(writes)!r}: w.pwrite(os.urandom(n), off)\n"
            f"{death}\n")
    proc = run_python(code, image)
    assert proc.returncode == (-signal.SIGKILL if how == "kill" else 0), proc.returncode


class WriterProcess:
    """``python -m blockmirror.cli.workload`` in its own process, logging writes.

    Tests get these from the ``live_writer`` fixture, which stops them."""

    def __init__(self, image: PathLike, log: PathLike, *, rate: str = "8M",
                 write_size: str = "64k", pattern: str = "uniform", seed: int = 3,
                 extra: list[str] | None = None) -> None:
        self.log = str(log)
        self.seed = seed
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "blockmirror.cli.workload", str(image), "--rate", rate,
             "--write-size", write_size, "--pattern", pattern, "--seed", str(seed),
             "--log", self.log, *(extra or [])],
        )

    def count(self) -> int:
        """Writes logged so far (each log record is 24 bytes)."""
        return os.path.getsize(self.log) // 24 if os.path.exists(self.log) else 0

    def wait_for_writes(self, n: int, timeout: float = 10.0) -> None:
        """Until N writes are logged; the writer must not exit meanwhile."""
        def enough() -> bool:
            assert self.proc.poll() is None, "writer exited early"
            return self.count() >= n

        wait_for(enough, timeout, f"{n} writes from the writer", every=0.01)

    def wait_for_more(self, n: int, timeout: float = 10.0) -> None:
        """Until N more writes than now are logged: the writer is not frozen."""
        self.wait_for_writes(self.count() + n, timeout)

    def stop(self) -> int:
        """SIGTERM and wait; its exit code (0: it stopped cleanly). Idempotent."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)

    def writes(self) -> list[tuple[int, int, int]]:
        return read_log(self.log)

    def replayed(self, initial: bytes, upto: int | None = None) -> bytes:
        """INITIAL with the first UPTO logged writes applied (all by default)."""
        writes = self.writes()
        return replay(initial, writes[:len(writes) if upto is None else upto], self.seed)

    def assert_point_in_time(self, copy: bytes, initial: bytes) -> int:
        """COPY must be INITIAL with exactly a prefix of the logged writes
        applied (the source at one instant); returns that prefix's length.
        (Discards leave no tag, and may zero another write's: the prefix is
        then looked for a little past the last tag COPY shows.)"""
        writes = self.writes()
        k = applied_prefix(copy, writes)
        out = bytearray(self.replayed(initial, k))
        if any(logged & DISCARD for _, _, logged in writes):
            # A discard may have zeroed the last tag the copy shows: walk on,
            # one operation at a time, looking for the instant.
            last = min(len(writes), k + 256)
            while out != copy and k < last:
                out[:] = replay(bytes(out), writes[k:k + 1], self.seed)
                k += 1
        assert out == copy, f"not the source at any instant (k={k})"
        return k


def replay(initial: bytes, writes: list[tuple[int, int, int]], seed: int) -> bytes:
    """INITIAL with WRITES applied in order (the image can grow)."""
    out = bytearray(initial)
    for seq, offset, logged in writes:
        length = logged & ~DISCARD
        if offset + length > len(out):
            out.extend(bytes(offset + length - len(out)))
        out[offset:offset + length] = (bytes(length) if logged & DISCARD
                                       else block_payload(seed, seq, length))
    return bytes(out)


def applied_prefix(content: bytes, writes: list[tuple[int, int, int]]) -> int:
    """How many writes (a prefix of the log) CONTENT shows: every block a
    write put down starts with its sequence number + 1."""
    highest = 0
    for seq, offset, logged in writes:
        if logged & DISCARD:
            continue
        tag = int.from_bytes(content[offset:offset + 8], "little")
        if tag == seq + 1:
            highest = max(highest, seq + 1)
    return highest


# -- a tiny filesystem ------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of SIZE (``mount -o size=``) at PATH (made here), for ENOSPC
    tests. Skips the test when not root or when the mount fails."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
