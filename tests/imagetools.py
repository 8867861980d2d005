"""Helpers for the sync tests: images with known content, a writer process
that logs every write, and replaying that log."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from blockmirror.cli.workload import block_payload, read_log

MiB = 1 << 20


def make_data_image(path: Path, size: int, extents: int = 8, extent_size: int = 1 * MiB,
                    seed: int = 1) -> bytes:
    """A sparse image with EXTENTS random extents; returns its full content."""
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
    return bytes(content)


def is_sparse(path: Path | str) -> bool:
    st = os.stat(path)
    return st.st_blocks * 512 < st.st_size


class WriterProcess:
    """``python -m blockmirror.cli.workload`` in its own process, logging writes."""

    def __init__(self, image: Path | str, log: Path | str, *, rate: str = "8M",
                 write_size: str = "64k", pattern: str = "uniform", seed: int = 3,
                 extra: list[str] | None = None) -> None:
        self.log = str(log)
        self.seed = seed
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "blockmirror.cli.workload", str(image), "--rate", rate,
             "--write-size", write_size, "--pattern", pattern, "--seed", str(seed),
             "--log", self.log, *(extra or [])],
        )

    def wait_for_writes(self, n: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.path.exists(self.log) and os.path.getsize(self.log) >= 24 * n:
                return
            assert self.proc.poll() is None, "writer exited early"
            time.sleep(0.01)
        raise AssertionError(f"writer made fewer than {n} writes in {timeout} s")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)

    def writes(self) -> list[tuple[int, int, int]]:
        return read_log(self.log)


def replay(initial: bytes, writes: list[tuple[int, int, int]], seed: int) -> bytes:
    """INITIAL with WRITES applied in order (the image can grow)."""
    out = bytearray(initial)
    for seq, offset, length in writes:
        if offset + length > len(out):
            out.extend(bytes(offset + length - len(out)))
        out[offset:offset + length] = block_payload(seed, seq, length)
    return bytes(out)


def applied_prefix(content: bytes, writes: list[tuple[int, int, int]]) -> int:
    """How many writes (a prefix of the log) CONTENT shows: every block a
    write put down starts with its sequence number + 1."""
    highest = 0
    for seq, offset, _length in writes:
        tag = int.from_bytes(content[offset:offset + 8], "little")
        if tag == seq + 1:
            highest = max(highest, seq + 1)
    return highest
