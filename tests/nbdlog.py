"""NBD writers that log every request, and the checks run on their logs.

Each connection (a thread with its own NbdClient, one request in flight)
writes, trims and zeroes random ranges inside stripes of the image that only
it touches. A stripe is not a multiple of the tracking granule, so
connections share granules (and bitmap words), and writes start and end
mid-granule; some are placed across a granule boundary on purpose. Every
request is logged with the time it was sent and the time its reply came.

Because each connection owns its bytes and has one request in flight, the
image at any instant is, per connection, a prefix of its log applied in
order. A copy that is "the source at one instant T" must therefore show, for
every connection, a prefix k whose requests were all sent before T while
request k was acknowledged after T.
"""

from __future__ import annotations

import math
import random
import threading
import time
from dataclasses import dataclass

import numpy as np
from nbdtools import NbdClient

STRIPE = 40 * 1024  # not a multiple of the 64 KiB granule: stripes share granules
GRANULE = 64 * 1024


@dataclass
class Op:
    kind: str  # "write", "trim" or "zero"
    offset: int
    length: int
    data: bytes | None
    sent: float
    acked: float = math.inf  # monotonic time of the reply; inf if none came


class LoggedWriter(threading.Thread):
    """Connection INDEX of CONNS: random requests in its own stripes until stopped."""

    def __init__(self, sock: str, index: int, conns: int, size: int, *, seed: int,
                 pause: float, zeroes: bool) -> None:
        super().__init__(name=f"nbd-writer-{index}", daemon=True)
        self.client = NbdClient(sock)
        self.rng = random.Random(seed * 1000 + index)
        self.stripes = list(range(index, size // STRIPE, conns))
        self.pause = pause
        self.zeroes = zeroes
        self.ops: list[Op] = []
        self.error: BaseException | None = None
        self.halt = threading.Event()

    def _range(self) -> tuple[int, int]:
        start = self.rng.choice(self.stripes) * STRIPE
        end = start + STRIPE
        boundary = -(-(start + 1) // GRANULE) * GRANULE  # first boundary inside the stripe
        if boundary < end and self.rng.random() < 0.3:  # straddle it
            off = boundary - self.rng.randint(1, min(4096, boundary - start))
            return off, min(end - off, boundary - off + self.rng.randint(1, 4096))
        off = self.rng.randrange(start, end)
        return off, self.rng.randint(1, min(end - off, self.rng.choice((512, 4096, 20000))))

    def _one(self) -> None:
        off, n = self._range()
        pick = self.rng.random()
        kind = ("write" if pick < 0.7 or not self.zeroes else
                "trim" if pick < 0.85 else "zero")
        data = self.rng.randbytes(n) if kind == "write" else None
        op = Op(kind, off, n, data, time.monotonic())
        self.ops.append(op)
        if data is not None:
            self.client.pwrite(data, off, fua=pick < 0.1)
        elif kind == "trim":
            self.client.trim(n, off)
        else:
            self.client.zero(n, off, may_trim=pick < 0.93)
        op.acked = time.monotonic()

    def run(self) -> None:
        try:
            while not self.halt.is_set():
                self._one()
                if self.pause:
                    time.sleep(self.pause)
        except BaseException as e:  # reported by WriteLog.stop
            self.error = e
        finally:
            self.client.close()


class WriteLog:
    """CONNS logged writers on the export at SOCK (an image of SIZE bytes)."""

    def __init__(self, sock: str, size: int, *, conns: int = 4, seed: int = 1,
                 pause: float = 0.0005, zeroes: bool = True) -> None:
        """ZEROES: trims and zeroes among the writes (30%), else writes only."""
        self.size, self.conns = size, conns
        self.writers = [LoggedWriter(sock, i, conns, size, seed=seed, pause=pause,
                                     zeroes=zeroes) for i in range(conns)]

    def start(self) -> WriteLog:
        for w in self.writers:
            w.start()
        return self

    def stop(self, *, check: bool = True) -> list[str]:
        """Stop every writer; the errors they met (with CHECK, any error
        fails the test)."""
        for w in self.writers:
            w.halt.set()
        for w in self.writers:
            w.join(60)
        errors = [f"{w.name}: {w.error!r}" for w in self.writers if w.error is not None]
        assert not (check and errors), f"NBD clients saw errors: {errors}"
        return errors

    def counts(self) -> list[int]:
        return [len(w.ops) for w in self.writers]

    def wait_for(self, n: int, timeout: float = 20.0) -> None:
        """Until every connection has N more acknowledged requests than now."""
        goal = [c + n for c in self.counts()]
        deadline = time.monotonic() + timeout
        while any(sum(1 for op in w.ops if op.acked < math.inf) < g
                  for w, g in zip(self.writers, goal, strict=True)):
            dead = [w.name for w in self.writers if not w.is_alive()]
            assert not dead, f"writers stopped early: {dead} {[w.error for w in self.writers]}"
            assert time.monotonic() < deadline, f"writers made no progress for {timeout} s"
            time.sleep(0.01)

    def acked_after(self, t: float) -> list[int]:
        """Per connection, requests acknowledged after monotonic time T."""
        return [sum(1 for op in w.ops if t < op.acked < math.inf) for w in self.writers]

    def replayed(self, initial: bytes, upto: list[int] | None = None) -> bytes:
        """INITIAL with every logged request applied (with UPTO, connection
        i's first UPTO[i]): once the writers stopped, what the image must
        hold (no acknowledged request lost)."""
        state = np.frombuffer(initial, dtype=np.uint8).copy()
        for i, w in enumerate(self.writers):
            for op in w.ops[:None if upto is None else upto[i]]:
                _apply(state, op)
        return state.tobytes()

    def assert_one_instant(self, copy: bytes, initial: bytes, *, after: float = -math.inf,
                           before: float = math.inf) -> list[int]:
        """COPY must be INITIAL with, per connection, a prefix of its log
        applied, all prefixes consistent with one instant T between AFTER
        and BEFORE (every request in them sent before T, the next one
        acknowledged after T). Returns the prefix lengths."""
        assert len(copy) == len(initial) == self.size
        tail = self.size - self.size % STRIPE
        assert copy[tail:] == initial[tail:], "bytes no writer touches changed"
        got = np.frombuffer(copy, dtype=np.uint8)
        windows = [_prefix_windows(w.ops, got, initial, i, self.conns)
                   for i, w in enumerate(self.writers)]
        assert all(windows), ("the copy is not any prefix of some connection's log: "
                              f"{[len(c) for c in windows]} candidate prefixes")
        # T can be taken just after the latest "sent" it must follow: one of these
        for t in sorted({after} | {lo for c in windows for lo, _hi, _k in c if lo > after}):
            if t >= before:
                break
            picks = [next((k for lo, hi, k in c if lo <= t < hi), None) for c in windows]
            if all(p is not None for p in picks):
                return [p for p in picks if p is not None]
        raise AssertionError(f"each connection's part is a prefix of its log, but no single "
                             f"instant between {after} and {before} explains them all: "
                             f"{windows}")


def _apply(state: np.ndarray, op: Op) -> None:
    if op.data is None:
        state[op.offset:op.offset + op.length] = 0
    else:
        state[op.offset:op.offset + op.length] = np.frombuffer(op.data, dtype=np.uint8)


def _prefix_windows(ops: list[Op], got: np.ndarray, initial: bytes, index: int,
                    conns: int) -> list[tuple[float, float, int]]:
    """Every k for which connection INDEX's stripes of GOT equal INITIAL with
    OPS[:k] applied, as (earliest T, latest T, k): T must come after op k-1
    was sent and before op k was acknowledged."""
    state = np.frombuffer(initial, dtype=np.uint8).copy()
    mine = np.zeros(len(state), dtype=bool)
    stripes = mine[:len(state) - len(state) % STRIPE].reshape(-1, STRIPE)  # a view
    stripes[index::conns] = True  # bytes past the last whole stripe are nobody's
    mismatched = int(np.count_nonzero((state != got) & mine))
    found = []
    for k in range(len(ops) + 1):
        if mismatched == 0:
            lo = ops[k - 1].sent if k else -math.inf
            hi = ops[k].acked if k < len(ops) else math.inf
            found.append((lo, hi, k))
        if k == len(ops):
            break
        op = ops[k]
        span = slice(op.offset, op.offset + op.length)
        mismatched -= int(np.count_nonzero(state[span] != got[span]))
        _apply(state, op)
        mismatched += int(np.count_nonzero(state[span] != got[span]))
    return found
