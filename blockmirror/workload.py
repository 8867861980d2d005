"""A steady writer: the stand-in for a VM or database writing to an image.

Writes through ``TrackedImage`` at a target rate (token bucket), in one of
three patterns, and can log every completed write so a test can replay them.
Used by the demo, the tests and the benchmark harness, always in a separate
process (``python -m blockmirror.workload``), because real writers are.

Every block written carries its sequence number in its first 8 bytes and
bytes derived from (seed, sequence) after that, so the content of any copy
tells which writes it holds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import struct
import sys
import time
from dataclasses import dataclass

from blockmirror.image import TrackedImage
from blockmirror.units import parse_size

PATTERNS = ("uniform", "hotspot", "sequential")
LOG_RECORD = struct.Struct("<QQQ")  # sequence, offset, length


def block_payload(seed: int, sequence: int, length: int) -> bytes:
    """The bytes write number SEQUENCE puts down: never all zero."""
    head = struct.pack("<Q", sequence + 1)
    body = random.Random(seed * 1_000_003 + sequence).randbytes(max(0, length - 8))
    return (head + body)[:length]


@dataclass
class WriterStats:
    writes: int
    bytes: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else 0.0


class OffsetPicker:
    """Where the next write goes, block-aligned within [0, size)."""

    def __init__(self, size: int, write_size: int, pattern: str, seed: int,
                 hot_fraction: float = 0.1) -> None:
        if pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {PATTERNS}")
        self.blocks = max(1, size // write_size)
        self.write_size = write_size
        self.pattern = pattern
        self.rng = random.Random(seed)
        self.hot_blocks = max(1, int(self.blocks * hot_fraction))
        self.next_block = 0

    def next(self) -> int:
        if self.pattern == "uniform":
            block = self.rng.randrange(self.blocks)
        elif self.pattern == "hotspot":
            # 90 % of writes go to the hot 10 % of the image.
            block = (self.rng.randrange(self.hot_blocks) if self.rng.random() < 0.9
                     else self.rng.randrange(self.blocks))
        else:
            block = self.next_block
            self.next_block = (self.next_block + 1) % self.blocks
        return block * self.write_size


def run_writer(
    image: str,
    *,
    rate: float,
    write_size: int = 65536,
    pattern: str = "uniform",
    seed: int = 0,
    seconds: float | None = None,
    max_writes: int | None = None,
    log_path: str | None = None,
    region: int | None = None,
) -> WriterStats:
    """Write to IMAGE at RATE bytes/s (0: as fast as possible) until SECONDS
    pass, MAX_WRITES are done, or SIGTERM/SIGINT arrives."""
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # Unbuffered: a record is in the file as soon as its write completed.
    log = open(log_path, "ab", buffering=0) if log_path else None  # noqa: SIM115
    writes = written = 0
    with TrackedImage(image) as img:
        picker = OffsetPicker(region or img.size, write_size, pattern, seed)
        start = time.monotonic()
        next_at = start
        while not stop:
            now = time.monotonic()
            if seconds is not None and now - start >= seconds:
                break
            if max_writes is not None and writes >= max_writes:
                break
            if rate > 0 and now < next_at:
                time.sleep(min(next_at - now, 0.05))
                continue
            offset = picker.next()
            img.pwrite(block_payload(seed, writes, write_size), offset)
            if log is not None:
                log.write(LOG_RECORD.pack(writes, offset, write_size))
            writes += 1
            written += write_size
            if rate > 0:
                # Token bucket without burst: the schedule never runs ahead of
                # real time by more than one write.
                next_at = max(next_at, now - write_size / rate) + write_size / rate
        elapsed = time.monotonic() - start
    if log is not None:
        log.close()
    return WriterStats(writes, written, elapsed)


def read_log(path: str) -> list[tuple[int, int, int]]:
    """(sequence, offset, length) of every logged write, in order."""
    with open(path, "rb") as f:
        data = f.read()
    usable = len(data) - len(data) % LOG_RECORD.size
    return [LOG_RECORD.unpack_from(data, i) for i in range(0, usable, LOG_RECORD.size)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blockmirror.workload",
                                     description="steady tracked writer for tests and benchmarks")
    parser.add_argument("image")
    parser.add_argument("--rate", default="8M", help="bytes per second (0: unlimited), e.g. 8M")
    parser.add_argument("--write-size", default="64k")
    parser.add_argument("--pattern", choices=PATTERNS, default="uniform")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--max-writes", type=int)
    parser.add_argument("--region", help="confine writes to the first N bytes")
    parser.add_argument("--log", help="append a binary record of each completed write")
    parser.add_argument("--stats", help="write achieved rate as JSON here on exit")
    args = parser.parse_args(argv)
    stats = run_writer(
        args.image, rate=parse_size(args.rate), write_size=parse_size(args.write_size),
        pattern=args.pattern, seed=args.seed, seconds=args.seconds, max_writes=args.max_writes,
        log_path=args.log, region=parse_size(args.region) if args.region else None,
    )
    if args.stats:
        tmp = args.stats + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"writes": stats.writes, "bytes": stats.bytes, "seconds": stats.seconds,
                       "rate": stats.rate}, f)
        os.replace(tmp, args.stats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
