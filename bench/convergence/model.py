"""The analytical pre-copy model: what the pass loop should do, on paper.

Each pass copies what the previous pass let the writers dirty; the dirty set
is bounded by the working set of the write pattern. The model runs the same
policy as ``blockmirror.migration.policy.ConvergencePolicy`` over these expected values,
so its passes, time, bytes and downtime can be put next to a measured run.

Symbols
-------
S   image size (bytes)                 A   allocated bytes when the copy starts
g   tracking granularity               w   write size (writes are w-aligned)
W   total write rate (bytes/s)         C   copy throughput (bytes/s)
T   target downtime (s)                N   writer processes (each at W/N)
u   = max(w, g): the unit one write dirties (both are powers of two, so a
    w-aligned write lies inside one unit, or covers whole granules)

Dirty bytes after writers run for t seconds on a clean bitmap
-------------------------------------------------------------
n = W t / w writes land on blocks b (size w) with probability p_b; a unit is
dirty once any write hit it, so with P_k = sum of p_b over the blocks of unit k:

    D(t) = u * sum_k [1 - (1 - P_k)^n]                        (random patterns)

- uniform: P_k = u / S, so D(t) = S (1 - (1 - u/S)^n) ~= S (1 - exp(-n u / S)):
  linear (= W t) while n is small, saturating at S;
- hotspot (``blockmirror.cli.workload``: 90 % of writes to the first 10 % of the
  blocks, 10 % anywhere): D(t) ~= H (1 - exp(-n (0.9/Nh + 0.1/Nu))) +
  (S - H)(1 - exp(-0.1 n / Nu)) with H the hot region, Nh = H/u, Nu = S/u:
  about the hot region for a long time, creeping towards S;
- zipf (rank r of B blocks with weight r^-s, ranks scattered over the image):
  the general sum above, over the actual P_k;
- sequential: the N writers each start at block 0 and move in step at W/N, so
  D(t) = min(S, ceil(W t / N / u) u).

N random writers at W/N each are one stream at W (independent picks), so
only the sequential pattern depends on N.

The passes, judged by the real policy
-------------------------------------
    pass 0 (bulk):   copies A in t_0 = A / C;              D_0 = D_bulk(t_0)
    pass i >= 1:     copies D_{i-1} in t_i = D_{i-1} / C;  D_i = D(t_i)

(a dirty pass fetches and clears the bitmap as it starts, so D_i counts the
units written during pass i). The bulk pass instead clears each work item's
bits just before it reads it, so a write to allocated data the pass has not
reached yet costs nothing: only units hit after the pass went by stay dirty.
With the allocation spread evenly (a = A / S) and the pass moving through it
in offset order, unit k at position x_k = (k + 1/2) / units is data with
probability a and then stays dirty only if hit in the last (1 - x_k) t_0:

    D_bulk(t) = u * sum_k [(1 - a)(1 - (1 - P_k)^n) + a (1 - (1 - P_k)^(n (1 - x_k)))]

(sequential writers: the written span, as D(t), an upper bound). After each pass the model asks
``blockmirror.migration.policy.ConvergencePolicy.decide`` itself, given these expected
passes as PassRecords, so model and engine can never follow different rules.
With the policy as it stands:

- switch over when D_i / C < T: the final pass copies D_i with writers paused,
  so downtime = D_i / C, time to switchover = t_0 + ... + t_i, bytes copied =
  A + D_0 + ... + D_i, passes = i + 2 (bulk, dirty passes, final);
- stalled (not converged) when 3 passes in a row each left at least
  ``stall_ratio`` (0.9) of what the previous one left; or out of passes.

Without saturation D_i = (W/C) D_{i-1}: a geometric series, so below the copy
rate the passes needed grow like log(D_0 / (C T)) / log(C / W), and from
W >= 0.9 C on, the stall rule fires after 3 dirty passes. Saturation makes D(t)
concave, so D_i / D_{i-1} < W / C: for a random pattern with W > C the sequence
tends to the fixed point D* = D(D* / C) > 0 (uniform: x* = 1 - exp(-(W/C) x*),
D* = x* S), from below (the dirty set grows) or from above (a bulk pass long
enough to dirty more than D*: it shrinks, ever more slowly). Either way the
ratio D_i / D_{i-1} tends to 1, and the stall rule fires once it is above 0.9.

Mirroring (``--converge mirror``)
--------------------------------
From the first dirty pass on, a write to a clean range goes to the copy too,
and a dirty pass starts by clearing the bitmap: what writers do during it is
mirrored, not left dirty. So the pass after the bulk copies D_0 and leaves
nothing (bar writes that met the copier's interlock, which the model leaves
out), at the pace ``ConvergencePolicy.mirror_copy_rate`` gives it, C less the
writers' rate while mirroring W_m, never under 0.4 C:

    pass 1 (mirrored): copies D_0 in t_1 = D_0 / max(0.4 C, C - W_m);   D_1 = 0

and the final pass has nothing left: passes = 3, downtime ~ 0. The measured
runs take one or two passes more (the interlock's fallbacks) and longer
than t_1 where the copier gets less than its pace.

What the model leaves out: per-pass fixed costs (bitmap scan, thread pool),
fsync, the writers' slow-down under CPU contention (feed it the achieved
rate), and noise.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

PATTERNS = ("uniform", "hotspot", "sequential", "zipf")
HOT_FRACTION = 0.1  # blockmirror.cli.workload: the hot 10 % of blocks ...
HOT_SHARE = 0.9  # ... take 90 % of the writes
DEFAULT_ZIPF_EXPONENT = 1.1


@dataclass(frozen=True)
class Workload:
    """What the writers do."""

    image_size: int
    write_rate: float  # W, bytes/s over all writers
    write_size: int = 65536
    pattern: str = "uniform"
    writers: int = 1
    granularity: int = 65536
    zipf_exponent: float = DEFAULT_ZIPF_EXPONENT

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {PATTERNS}, got {self.pattern!r}")
        if self.image_size <= 0 or self.write_size <= 0 or self.granularity <= 0:
            raise ValueError("image size, write size and granularity must be > 0")
        if self.write_rate < 0 or self.writers < 1:
            raise ValueError("write rate must be >= 0 and writers >= 1")


class DirtyModel:
    """D(t): expected dirty bytes after writers ran for t seconds on a clean
    bitmap (see the module docstring)."""

    def __init__(self, workload: Workload) -> None:
        self.w = workload
        self.unit = max(workload.write_size, workload.granularity)
        self.units = max(1, -(-workload.image_size // self.unit))
        self._log_miss: np.ndarray | None = None
        if workload.pattern != "sequential":
            probs = self._unit_probabilities()
            # log(1 - P_k), exact for small P_k as well
            self._log_miss = np.log1p(-np.minimum(probs, 1.0 - 1e-15))

    def _block_probabilities(self) -> np.ndarray:
        wl = self.w
        blocks = max(1, wl.image_size // wl.write_size)
        if wl.pattern == "uniform":
            return np.full(blocks, 1.0 / blocks)
        if wl.pattern == "hotspot":
            hot = max(1, int(blocks * HOT_FRACTION))
            p = np.full(blocks, (1.0 - HOT_SHARE) / blocks)
            p[:hot] += HOT_SHARE / hot
            return p
        # zipf: weights by rank, the ranks scattered as blockmirror.cli.workload does
        from blockmirror.cli.workload import zipf_permutation

        ranks = np.arange(1, blocks + 1, dtype=np.float64)
        weights = ranks ** -wl.zipf_exponent
        p_rank = weights / weights.sum()
        p = np.empty(blocks)
        p[np.asarray(zipf_permutation(blocks), dtype=np.int64)] = p_rank
        return p

    def _unit_probabilities(self) -> np.ndarray:
        wl = self.w
        p = self._block_probabilities()
        if wl.write_size >= wl.granularity:
            return p  # one block is one unit
        per_unit = wl.granularity // wl.write_size
        pad = (-len(p)) % per_unit
        if pad:
            p = np.concatenate([p, np.zeros(pad)])
        units: np.ndarray = p.reshape(-1, per_unit).sum(axis=1)
        return units

    def dirty_after_writes(self, writes: float) -> float:
        """Expected dirty bytes after WRITES writes (all writers together)."""
        if writes <= 0:
            return 0.0
        size = float(self.w.image_size)
        if self.w.pattern == "sequential":
            span = writes * self.w.write_size / self.w.writers
            return min(size, math.ceil(span / self.unit) * self.unit)
        assert self._log_miss is not None
        hit = -np.expm1(writes * self._log_miss)  # 1 - (1 - P_k)^n
        return min(size, float(hit.sum()) * self.unit)

    def dirty_after(self, seconds: float) -> float:
        """D(t) for the workload's write rate."""
        return self.dirty_after_writes(self.w.write_rate * max(0.0, seconds) / self.w.write_size)

    def dirty_after_bulk(self, seconds: float, allocated_fraction: float) -> float:
        """D_bulk(t): dirty bytes left by a bulk pass of SECONDS that clears
        each range as it reaches it (see the module docstring)."""
        writes = self.w.write_rate * max(0.0, seconds) / self.w.write_size
        if writes <= 0:
            return 0.0
        if self.w.pattern == "sequential":
            return self.dirty_after_writes(writes)
        assert self._log_miss is not None
        a = min(1.0, max(0.0, allocated_fraction))
        behind = 1.0 - (np.arange(self.units) + 0.5) / self.units
        hit_anywhere = -np.expm1(writes * self._log_miss)
        hit_behind = -np.expm1(writes * behind * self._log_miss)
        expected = (1.0 - a) * hit_anywhere + a * hit_behind
        return min(float(self.w.image_size), float(expected.sum()) * self.unit)

    def fixed_point(self, copy_throughput: float) -> float:
        """D* = D(D*/C): where the dirty set settles when every pass copies
        what the previous one let the writers dirty (0 when W <= C, roughly)."""
        if copy_throughput <= 0:
            return float(self.w.image_size)
        d = float(self.w.image_size)
        for _ in range(200):
            nxt = self.dirty_after(d / copy_throughput)
            if abs(nxt - d) < 1.0:
                return nxt
            d = nxt
        return d


@dataclass
class ModelPass:
    index: int
    kind: str
    bytes: float
    seconds: float
    dirty_left: float


@dataclass
class Prediction:
    """What the model says one sync does."""

    converged: bool
    reason: str  # "switchover", "stalled" or "out_of_passes"
    passes: int  # pass records, final pass included (as SyncResult.passes)
    switchover_s: float  # time until the switchover (or the give-up) decision
    bytes_copied: float
    downtime_s: float  # 0 when not converged
    fixed_point: float  # D*, bytes
    pass_list: list[ModelPass] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["pass_list"] = [asdict(p) for p in self.pass_list]
        return out


def predict(
    workload: Workload,
    *,
    allocated: float,
    copy_throughput: float,
    target_downtime: float,
    max_passes: int = 30,
    mirror_writer_rate: float | None = None,
) -> Prediction:
    """Run the pass loop of blockmirror.sync on expected values, with the
    decisions taken by blockmirror's own ConvergencePolicy. With
    MIRROR_WRITER_RATE (bytes/s writers got while mirroring), the passes
    after the bulk one are mirrored (see the module docstring)."""
    from blockmirror.migration.policy import ConvergencePolicy, Decision, PassRecord

    if copy_throughput <= 0:
        raise ValueError("copy throughput must be > 0")
    policy = ConvergencePolicy(target_downtime=target_downtime, max_passes=max_passes)
    dirty = DirtyModel(workload)
    c = copy_throughput
    t = allocated / c
    bulk_left = dirty.dirty_after_bulk(t, allocated / max(1, workload.image_size))
    passes = [ModelPass(0, "bulk", allocated, t, bulk_left)]
    elapsed = t
    fixed = dirty.fixed_point(c)
    while True:
        # Whole bytes, as measured; a pass's time is its bytes / C, so the
        # policy's throughput estimate is C.
        records = [PassRecord(index=p.index, kind=p.kind, bytes=round(p.bytes),
                              seconds=p.seconds if p.bytes else 0.0,
                              dirty_left=round(p.dirty_left),
                              paced=mirror_writer_rate is not None and p.kind == "dirty")
                   for p in passes]
        decision = policy.decide(records)
        last = passes[-1]
        if decision is Decision.SWITCHOVER:
            final = last.dirty_left / c
            passes.append(ModelPass(len(passes), "final", last.dirty_left, final, 0.0))
            return Prediction(True, "switchover", len(passes), elapsed,
                              sum(p.bytes for p in passes), final, fixed, passes)
        if decision is not Decision.CONTINUE:
            return Prediction(False, decision.value, len(passes), elapsed,
                              sum(p.bytes for p in passes), 0.0, fixed, passes)
        if mirror_writer_rate is None:
            t = last.dirty_left / c
            left = dirty.dirty_after(t)
        else:
            t = last.dirty_left / policy.mirror_copy_rate(c, mirror_writer_rate)
            left = 0.0
        elapsed += t
        passes.append(ModelPass(len(passes), "dirty", last.dirty_left, t, left))
