"""A steady writer: the stand-in for a VM or database writing to an image.

Writes through ``TrackedImage`` at a target rate (token bucket), in one of
four patterns, and can log every completed write so a test can replay them.
With ``--stats`` it reports what it achieved; ``--timeline`` adds samples of
(monotonic time, bytes written) so a benchmark can tell the rate during a copy.
Used by the demo, the tests and the benchmark harness, always in a separate
process (``python -m blockmirror.cli.workload``), because real writers are.

Every block written carries its sequence number in its first 8 bytes and
bytes derived from (seed, sequence) after that, so the content of any copy
tells which writes it holds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import struct
import sys
import time
from dataclasses import dataclass

from blockmirror.tracking.image import TrackedImage
from blockmirror.units import parse_size

PATTERNS = ("uniform", "hotspot", "sequential", "zipf")
DEFAULT_ZIPF_EXPONENT = 1.1
LOG_RECORD = struct.Struct("<QQQ")  # sequence, offset, length
# A logged length with this bit set is a discard of that many bytes (they read as zeros).
DISCARD = 1 << 63


def block_payload(seed: int, sequence: int, length: int) -> bytes:
    """The bytes write number SEQUENCE puts down: never all zero."""
    head = struct.pack("<Q", sequence + 1)
    body = random.Random(seed * 1_000_003 + sequence).randbytes(max(0, length - 8))
    return (head + body)[:length]


def zipf_permutation(blocks: int) -> list[int]:
    """Where the zipf pattern puts rank r (0 = hottest): the same scattering for
    every writer and seed, so N writers share one hot set (as N threads of one
    guest would), and a model can compute the same distribution."""
    order = list(range(blocks))
    random.Random(0x5A1F).shuffle(order)
    return order


@dataclass
class WriterStats:
    writes: int
    bytes: int
    seconds: float
    started: float = 0.0  # time.monotonic() when writing began
    max_write_seconds: float = 0.0  # the longest single write (a freeze shows here)
    timeline: list[tuple[float, int]] | None = None  # (time.monotonic(), bytes so far)
    latencies: list[tuple[float, float]] | None = None  # (start, seconds) of each timed write

    @property
    def rate(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else 0.0


class OffsetPicker:
    """Where the next write goes, block-aligned within [0, size)."""

    def __init__(self, size: int, write_size: int, pattern: str, seed: int,
                 hot_fraction: float = 0.1,
                 zipf_exponent: float = DEFAULT_ZIPF_EXPONENT) -> None:
        if pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {PATTERNS}")
        self.blocks = max(1, size // write_size)
        self.write_size = write_size
        self.pattern = pattern
        self.rng = random.Random(seed)
        self.hot_blocks = max(1, int(self.blocks * hot_fraction))
        self.next_block = 0
        if pattern == "zipf":
            # Rank r (1-based) has weight r^-s; ranks map to scattered blocks.
            import bisect
            import itertools

            weights = [r ** -zipf_exponent for r in range(1, self.blocks + 1)]
            self._zipf_cdf = list(itertools.accumulate(weights))
            self._zipf_blocks = zipf_permutation(self.blocks)
            self._bisect = bisect.bisect_left

    def next(self) -> int:
        if self.pattern == "uniform":
            block = self.rng.randrange(self.blocks)
        elif self.pattern == "hotspot":
            # 90 % of writes go to the hot 10 % of the image.
            block = (self.rng.randrange(self.hot_blocks) if self.rng.random() < 0.9
                     else self.rng.randrange(self.blocks))
        elif self.pattern == "zipf":
            cdf = self._zipf_cdf
            rank = min(self._bisect(cdf, self.rng.random() * cdf[-1]), self.blocks - 1)
            block = self._zipf_blocks[rank]
        else:
            block = self.next_block
            self.next_block = (self.next_block + 1) % self.blocks
        return block * self.write_size


class _StopFlag:
    """Set by SIGTERM/SIGINT: the writer finishes its write and stops."""

    def __init__(self) -> None:
        self.set = False
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.set = True


@dataclass
class _Tally:
    """What one writer has done so far, and (timed) when and how long."""

    timed: bool
    writes: int = 0
    written: int = 0
    longest: float = 0.0
    timeline: list[tuple[float, int]] | None = None
    latencies: list[tuple[float, float]] | None = None

    def __post_init__(self) -> None:
        if self.timed:
            self.timeline, self.latencies = [], []

    def discard(self, img: TrackedImage, offset: int, length: int) -> None:
        img.discard(offset, length)
        self.writes += 1

    def write(self, img: TrackedImage, payload: bytes, offset: int) -> None:
        if self.latencies is None:
            img.pwrite(payload, offset)
        else:
            began = time.monotonic()
            img.pwrite(payload, offset)
            took = time.monotonic() - began
            self.latencies.append((began, took))
            self.longest = max(self.longest, took)
        self.writes += 1
        self.written += len(payload)


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
    zipf_exponent: float = DEFAULT_ZIPF_EXPONENT,
    timeline_interval: float | None = None,
    burst: float = 0.0,
    base: int = 0,
    unaligned: bool = False,
    discard_every: int = 0,
) -> WriterStats:
    """Write to IMAGE at RATE bytes/s (0: as fast as possible) until SECONDS
    pass, MAX_WRITES are done, or SIGTERM/SIGINT arrives.

    With TIMELINE_INTERVAL, (time.monotonic(), bytes written) is sampled about
    that often into the returned stats. BURST (seconds) lets a writer that fell
    behind its schedule (a late wake-up on a busy machine) catch up on that
    much lost time at full speed; 0 (the default) never runs ahead by more than
    one write.

    Writes land in [BASE, BASE + REGION). UNALIGNED shifts each one by a few
    bytes off its block (it still ends inside the region); with
    DISCARD_EVERY = N, every Nth operation discards a whole block instead
    (logged with the DISCARD bit in its length)."""
    stop = _StopFlag()
    # Unbuffered: a record is in the file as soon as its write completed.
    log = open(log_path, "ab", buffering=0) if log_path else None  # noqa: SIM115
    tally = _Tally(timed=bool(timeline_interval))
    with TrackedImage(image) as img:
        span = (region or img.size - base) - (write_size if unaligned else 0)
        picker = OffsetPicker(max(write_size, span), write_size, pattern, seed,
                              zipf_exponent=zipf_exponent)
        shifts = random.Random(seed + 7)
        start = next_at = sample_at = time.monotonic()
        while not stop.set:
            now = time.monotonic()
            if tally.timeline is not None and now >= sample_at:
                tally.timeline.append((now, tally.written))
                sample_at = now + timeline_interval  # type: ignore[operator]
            if (seconds is not None and now - start >= seconds) or (
                    max_writes is not None and tally.writes >= max_writes):
                break
            if rate > 0 and now < next_at:
                time.sleep(min(next_at - now, 0.05))
                continue
            offset = base + picker.next()
            sequence = tally.writes
            if discard_every and sequence % discard_every == discard_every - 1:
                tally.discard(img, offset, write_size)
                record = LOG_RECORD.pack(sequence, offset, write_size | DISCARD)
            else:
                if unaligned:
                    offset += shifts.randrange(1, 512)
                tally.write(img, block_payload(seed, sequence, write_size), offset)
                record = LOG_RECORD.pack(sequence, offset, write_size)
            if log is not None:
                log.write(record)
            if rate > 0:
                # Token bucket: by default without burst, so the schedule never
                # runs ahead of real time by more than one write.
                next_at = max(next_at, now - burst - write_size / rate) + write_size / rate
        elapsed = time.monotonic() - start
        if tally.timeline is not None:
            tally.timeline.append((start + elapsed, tally.written))
    if log is not None:
        log.close()
    return WriterStats(tally.writes, tally.written, elapsed, start, tally.longest,
                       tally.timeline, tally.latencies)


def read_log(path: str) -> list[tuple[int, int, int]]:
    """(sequence, offset, length) of every logged write, in order."""
    with open(path, "rb") as f:
        data = f.read()
    usable = len(data) - len(data) % LOG_RECORD.size
    return [LOG_RECORD.unpack_from(data, i) for i in range(0, usable, LOG_RECORD.size)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blockmirror.cli.workload",
                                     description="steady tracked writer for tests and benchmarks")
    parser.add_argument("image")
    parser.add_argument("--rate", default="8M", help="bytes per second (0: unlimited), e.g. 8M")
    parser.add_argument("--write-size", default="64k")
    parser.add_argument("--pattern", choices=PATTERNS, default="uniform")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--max-writes", type=int)
    parser.add_argument("--region", help="confine writes to N bytes (from --base)")
    parser.add_argument("--base", default="0", help="where the region starts (default 0)")
    parser.add_argument("--unaligned", action="store_true",
                        help="shift each write 1-511 bytes off its block")
    parser.add_argument("--discard-every", type=int, default=0, metavar="N",
                        help="every Nth operation discards a block instead of writing")
    parser.add_argument("--log", help="append a binary record of each completed write")
    parser.add_argument("--stats", help="write achieved rate as JSON here on exit")
    parser.add_argument("--zipf-exponent", type=float, default=DEFAULT_ZIPF_EXPONENT,
                        help="skew of the zipf pattern (default %(default)s)")
    parser.add_argument("--burst", type=float, default=0.0, metavar="SECONDS",
                        help="let a writer that fell behind catch up on up to this much "
                        "lost time (default 0: no catching up)")
    parser.add_argument("--timeline", type=float, metavar="SECONDS",
                        help="with --stats: also sample (monotonic time, bytes written) this "
                        "often, and time each write (the longest one is reported)")
    args = parser.parse_args(argv)
    stats = run_writer(
        args.image, rate=parse_size(args.rate), write_size=parse_size(args.write_size),
        pattern=args.pattern, seed=args.seed, seconds=args.seconds, max_writes=args.max_writes,
        log_path=args.log, region=parse_size(args.region) if args.region else None,
        zipf_exponent=args.zipf_exponent, timeline_interval=args.timeline, burst=args.burst,
        base=parse_size(args.base), unaligned=args.unaligned, discard_every=args.discard_every,
    )
    if args.stats:
        tmp = args.stats + ".tmp"
        out: dict[str, object] = {"writes": stats.writes, "bytes": stats.bytes,
                                  "seconds": stats.seconds, "rate": stats.rate}
        if stats.timeline is not None:
            out.update(started=stats.started, max_write_seconds=stats.max_write_seconds,
                       timeline=stats.timeline, latencies=stats.latencies)
        # Created exclusively, never through a link (the folder may be shared).
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644)
        with os.fdopen(fd, "w") as f:
            json.dump(out, f)
        os.replace(tmp, args.stats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
