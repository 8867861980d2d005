"""Convergence versus write rate: the matrix runner.

For every write rate of the matrix (and every repetition) the harness

1. makes a fresh sparse image (``blockmirror.cli.demo.make_demo_image``: the
   allocated fraction in 4 MiB extents of random data) and turns tracking on;
2. starts N writer processes (``python -m blockmirror.cli.workload``), each at
   rate/N, waits until all of them write, lets them run a moment;
3. calls ``blockmirror.sync.sync`` in this process with the copy throughput
   capped (``rate_limit``: the stand-in for slower storage or NFS) and
   ``verify=True``, observing every decision its convergence policy takes;
4. on non-convergence checks that the source side is as sync promises: no
   destination file left, writers neither frozen nor throttled and still
   writing, the sidecar consistent;
5. stops the writers and reads what they achieved (with a timeline, so the
   rate *during* the copy is known, and the longest single write, which is
   the pause the writers saw).

Each run is put next to the analytical model (``model.py``) fed with that
run's measured copy throughput and achieved write rate, and, with ``--qemu``,
the same point is run against QEMU's block mirror (``qemu_peer.py``).

Issue 10: ``--converge`` may name several strategies (``mirror,auto``, each
optionally ``+defer``), each run as its own row labelled "blockmirror NAME";
``--dest-bandwidth`` puts every engine's destination on a
``slowdisk.slow_disk`` mount (copies and mirrored writes then share its
bandwidth; no copy cap by default) and measures the destination's own write
latency with fio first; the rows then carry the mirrored phase (when sync
engaged and stopped mirroring), what writers achieved in it and their write
latency p99, and ``result.strategy``. ``--qemu-wb`` adds QEMU's
``copy-mode=write-blocking`` mirror. ``issue10.py`` renders the verdicts.

Outputs in the output folder: ``runs.json`` and ``runs.csv`` (one row per
run), ``summary.csv`` (medians per engine and rate), ``summary.md`` (tables and
the target verdicts), ``model.json`` (model curves) and PNG plots.

Timing definitions (the same for both engines where they apply):

- ``decision_s``: from the start of the sync to the moment the policy decided to
  switch over (or gave up). For QEMU, ``ready_s``: the job reported "ready".
- ``downtime_s``: the pause measured by sync (freeze to thaw); for QEMU the
  ``job-complete`` call until the job concluded, with the guest disconnected.
- ``writer_max_write_s``: the longest single write any writer saw: the pause as
  the writers felt it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import itertools
import json
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from . import model as _model

MiB = 1 << 20
KiB = 1 << 10
Row = dict[str, Any]
Log = Callable[[str], None]

DEFAULT_RATES_MIB = (0, 8, 16, 32, 48, 56, 64, 80, 128)
DEFAULT_MAX_PASSES = 15  # sync's own default is 30; a saturated pass takes seconds
DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "results" / "convergence"
WRITER_TIMELINE_S = 0.05
# Writers may catch up on this much time lost to late wake-ups (fio's rate
# control catches up too); without it they fall short on a busy 2-core box.
WRITER_BURST_S = 0.1
# At one rate, the engines are compared only if blockmirror's writers got at
# least this share of the rate QEMU's guest got.
COMPARABLE_RATE_SHARE = 0.95
# Who writes on blockmirror's side: Python processes through TrackedImage, or
# fio through ``blockmirror serve`` (the QEMU peer's guest command).
FRONTENDS = ("python", "nbd")
CONVERGE_CHOICES = ("fail", "throttle", "mirror", "auto")


def split_strategy(name: str) -> tuple[str, bool]:
    """"mirror" -> ("mirror", False); "fail+defer" -> ("fail", True): a
    strategy with hot-block deferral, so one matrix holds both."""
    base, plus, suffix = name.partition("+")
    if plus and suffix != "defer":
        return "", False
    return base, bool(plus)


@dataclass
class MatrixConfig:
    """One matrix: every rate x every repetition, one engine or two."""

    image_size: int = 256 * MiB
    allocated_fraction: float = 0.5
    granularity: int = 64 * KiB
    rates: list[float] = field(default_factory=lambda: [r * MiB for r in DEFAULT_RATES_MIB])
    pattern: str = "uniform"
    write_size: int = 64 * KiB
    writers: int = 2
    target_downtime: float = 0.5
    copy_cap: float | None = 64 * MiB  # bytes/s; None: uncapped
    repetitions: int = 1
    seed: int = 1
    output: Path = DEFAULT_OUTPUT
    max_passes: int = DEFAULT_MAX_PASSES
    # sync's answer when writes outpace the copy: fail | throttle | mirror | auto, or
    # several, comma separated (each runs at every point as its own engine row)
    converge: str = "fail"
    defer_hot: bool = False  # sync's hot-block deferral
    # Destination bandwidth (bytes/s): the copy goes to a slowdisk.slow_disk
    # mount (root only), the QEMU peer's target too. None: the workdir's disk.
    dest_bandwidth: float | None = None
    qemu_wb: bool = False  # also QEMU's copy-mode=write-blocking (engine "qemu-wb")
    copy_workers: int = 4
    warmup_s: float = 0.5
    verify: bool = True
    zipf_exponent: float = _model.DEFAULT_ZIPF_EXPONENT
    qemu: bool = False
    qemu_timeout_s: float = 30.0
    workdir: Path | None = None  # scratch images; default: a temporary folder
    plots: bool = True
    frontend: str = "python"  # one of FRONTENDS

    def __post_init__(self) -> None:
        if self.frontend not in FRONTENDS:
            raise ValueError(f"frontend must be one of {FRONTENDS}")
        if self.pattern not in _model.PATTERNS:
            raise ValueError(f"pattern must be one of {_model.PATTERNS}")
        if not 0 < self.allocated_fraction <= 1:
            raise ValueError("allocated fraction must be in (0, 1]")
        if self.image_size < 4 * MiB:
            raise ValueError("image size must be at least 4 MiB")
        if self.writers < 1 or self.repetitions < 1:
            raise ValueError("writers and repetitions must be at least 1")
        if any(r < 0 for r in self.rates) or not self.rates:
            raise ValueError("rates must be a non-empty list of values >= 0")
        if self.copy_cap is not None and self.copy_cap <= 0:
            raise ValueError("copy cap must be > 0 (or None for none)")
        bad = [c for c in self.strategies if split_strategy(c)[0] not in CONVERGE_CHOICES]
        if bad or not self.strategies:
            raise ValueError(f"converge must be one or more of {CONVERGE_CHOICES}")
        if self.dest_bandwidth is not None and self.dest_bandwidth <= 0:
            raise ValueError("destination bandwidth must be > 0 (or None for none)")
        self.output = Path(self.output)

    @property
    def strategies(self) -> list[str]:
        return [c for c in self.converge.replace(" ", "").split(",") if c]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["output"] = str(self.output)
        out["workdir"] = str(self.workdir) if self.workdir else None
        return out


@dataclass
class MatrixResult:
    config: MatrixConfig
    rows: list[Row]
    copy_throughput: float  # bytes/s, the measured C (median of the bulk passes)
    targets: dict[str, Any]
    files: dict[str, Path]
    notes: list[str]
    started: str
    command: str


# -- watching the policy ------------------------------------------------------------


@dataclass
class Decision:
    at: float  # time.perf_counter()
    decision: str  # a blockmirror.migration.policy.Decision value
    passes: int  # passes the policy had seen


@dataclass
class PolicyLog:
    decisions: list[Decision] = field(default_factory=list)
    passes: list[Any] = field(default_factory=list)  # PassRecords, as last seen
    mirror_on: list[float] = field(default_factory=list)  # perf_counter() mirroring engaged
    mirror_off: list[float] = field(default_factory=list)  # perf_counter() it stopped


@contextlib.contextmanager
def observe_policy() -> Iterator[PolicyLog]:
    """Record every decision the convergence policy of ``blockmirror.sync``
    takes, and the passes it saw, without changing what it decides.

    sync() raises NotConvergedError without handing back its passes; the
    policy sees them all, so the harness watches it. Installed only around one
    sync() call in this process (not thread-safe: one sync at a time).
    """
    # The sync builds its policy through blockmirror.migration.options (SyncOptions.policy).
    options_module = importlib.import_module("blockmirror.migration.options")
    base = getattr(options_module, "ConvergencePolicy", None)
    if base is None:
        raise RuntimeError("blockmirror.migration.options has no ConvergencePolicy to observe; "
                           "the harness needs updating")
    log = PolicyLog()

    class ObservedPolicy(base):  # type: ignore[misc, valid-type]
        def decide(self, passes: list[Any], stall_from: int = 0) -> Any:
            decision = super().decide(passes, stall_from)
            log.decisions.append(Decision(time.perf_counter(), decision.value, len(passes)))
            log.passes[:] = list(passes)
            return decision

    setattr(options_module, "ConvergencePolicy", ObservedPolicy)  # noqa: B010
    try:
        with _observe_mirror(log):
            yield log
    finally:
        setattr(options_module, "ConvergencePolicy", base)  # noqa: B010


@contextlib.contextmanager
def _observe_mirror(log: PolicyLog) -> Iterator[None]:
    """When the sync job engaged and stopped mirroring (the mirrored phase)."""
    job_module = importlib.import_module("blockmirror.migration.job")
    job = getattr(job_module, "FileSyncJob", None)
    start, stop = getattr(job, "_start_mirror", None), getattr(job, "_stop_mirror", None)
    if job is None or start is None or stop is None:  # a tree without mirroring
        yield
        return

    def started(self: Any) -> None:
        start(self)
        if getattr(self, "mirror", None) is not None:
            log.mirror_on.append(time.perf_counter())

    def stopped(self: Any, *args: Any, **kwargs: Any) -> None:
        engaged = getattr(self, "mirror", None) is not None
        try:
            stop(self, *args, **kwargs)
        finally:
            if engaged:
                log.mirror_off.append(time.perf_counter())

    setattr(job, "_start_mirror", started)  # noqa: B010
    setattr(job, "_stop_mirror", stopped)  # noqa: B010
    try:
        yield
    finally:
        setattr(job, "_start_mirror", start)  # noqa: B010
        setattr(job, "_stop_mirror", stop)  # noqa: B010


# -- writers --------------------------------------------------------------------------


class Writers(Protocol):
    """What a point needs from its writers (``WriterGroup``, or
    ``nbd_frontend.FioGuest`` for ``--frontend nbd``)."""

    @property
    def procs(self) -> Sequence[subprocess.Popen[bytes]]: ...
    def wait_attached(self, image: Path, timeout: float = ...) -> None: ...
    def alive(self) -> bool: ...
    def check_alive(self) -> None: ...
    def stop(self) -> None: ...
    def bytes_at(self, t: float) -> float: ...
    def rate_between(self, t0: float, t1: float) -> float: ...
    @property
    def overall_rate(self) -> float: ...
    @property
    def max_write_s(self) -> float: ...


def start_writers(image: Path, rate: float, cfg: MatrixConfig, seed: int,
                  folder: Path) -> Writers:
    if cfg.frontend == "nbd":
        from .nbd_frontend import FioGuest

        return FioGuest.start(image, rate, cfg, seed, folder)
    return WriterGroup.start(image, rate, cfg, seed, folder)


@dataclass
class WriterGroup:
    """N workload processes on one image; the rate split evenly."""

    procs: list[subprocess.Popen[bytes]]
    stats_paths: list[Path]
    stats: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def start(cls, image: Path, rate: float, cfg: MatrixConfig, seed: int,
              folder: Path) -> WriterGroup:
        procs: list[subprocess.Popen[bytes]] = []
        paths: list[Path] = []
        if rate <= 0:
            return cls(procs, paths)
        each = max(1, int(rate / cfg.writers))
        for i in range(cfg.writers):
            stats = folder / f"writer{i}.json"
            paths.append(stats)
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "blockmirror.cli.workload", str(image), "--rate", str(each),
                 "--write-size", str(cfg.write_size), "--pattern", cfg.pattern,
                 "--zipf-exponent", str(cfg.zipf_exponent), "--seed", str(seed * 1000 + i),
                 "--stats", str(stats), "--timeline", str(WRITER_TIMELINE_S),
                 "--burst", str(WRITER_BURST_S)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            ))
        return cls(procs, paths)

    def wait_attached(self, image: Path, timeout: float = 20.0) -> None:
        """Until every writer has the sidecar open (it registers as a writer)."""
        if not self.procs:
            return
        from blockmirror.tracking.tracker import Tracker

        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            with Tracker.open(image) as tracker:
                if tracker.live_writers() >= len(self.procs):
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"writers did not start within {timeout:.0f} s")
            time.sleep(0.02)

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def check_alive(self) -> None:
        for p in self.procs:
            if p.poll() is not None:
                err = p.stderr.read().decode(errors="replace") if p.stderr else ""
                raise RuntimeError(f"writer exited early (status {p.returncode}): {err[-400:]}")

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.stderr:
                p.stderr.close()
        self.stats = []
        for path in self.stats_paths:
            with contextlib.suppress(FileNotFoundError, ValueError):
                self.stats.append(json.loads(path.read_text()))

    def bytes_at(self, t: float) -> float:
        """Bytes all writers had written at time.monotonic() T (interpolated)."""
        return sum(_interpolate(s.get("timeline") or [], t) for s in self.stats)

    def rate_between(self, t0: float, t1: float) -> float:
        if t1 <= t0 or not self.stats:
            return 0.0
        return (self.bytes_at(t1) - self.bytes_at(t0)) / (t1 - t0)

    @property
    def overall_rate(self) -> float:
        return sum(float(s.get("rate", 0.0)) for s in self.stats)

    @property
    def max_write_s(self) -> float:
        return max((float(s.get("max_write_seconds", 0.0)) for s in self.stats), default=0.0)

    def latency_p99(self, t0: float, t1: float) -> float | None:
        """p99 of the single writes that began within [t0, t1] (monotonic)."""
        lat = [d for s in self.stats for b, d in (s.get("latencies") or []) if t0 <= b <= t1]
        return percentile(lat, 99) if lat else None


def percentile(values: Sequence[float], pct: float) -> float:
    """The PCT-th percentile (nearest rank) of VALUES."""
    ordered = sorted(values)
    return float(ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)])


def _interpolate(timeline: Sequence[Sequence[float]], t: float) -> float:
    if not timeline:
        return 0.0
    if t <= timeline[0][0]:
        return float(timeline[0][1])
    for (t0, b0), (t1, b1) in itertools.pairwise(timeline):
        if t0 <= t <= t1:
            return b0 + (b1 - b0) * ((t - t0) / (t1 - t0) if t1 > t0 else 1.0)
    return float(timeline[-1][1])


# -- one blockmirror point -------------------------------------------------------------


def make_source(folder: Path, cfg: MatrixConfig, seed: int, *, tracked: bool) -> tuple[Path, int]:
    """A fresh source image (and sidecar); returns its path and allocated bytes."""
    from blockmirror.cli.demo import make_demo_image

    folder.mkdir(parents=True, exist_ok=True)
    image = folder / "image.img"
    for stale in (image, Path(str(image) + ".cbt")):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    allocated = make_demo_image(str(image), cfg.image_size, cfg.allocated_fraction, seed)
    os.chmod(image, 0o600)
    if tracked:
        from blockmirror.tracking.tracker import Tracker

        Tracker.create(image, cfg.granularity).close()
    return image, allocated


@contextlib.contextmanager
def destination(cfg: MatrixConfig, folder: Path) -> Iterator[Path]:
    """An empty folder for the copy: on a slow disk of cfg.dest_bandwidth
    (everything undone on exit), else FOLDER/dst."""
    if cfg.dest_bandwidth is None:
        dst = folder / "dst"
        dst.mkdir(parents=True)
        yield dst
        return
    from .slowdisk import slow_disk

    size = max(1 << 30, 2 * cfg.image_size + (256 << 20))
    folder.mkdir(parents=True, exist_ok=True)
    with slow_disk(int(cfg.dest_bandwidth), size=size, parent=folder) as mnt:
        dst = mnt / "dst"
        dst.mkdir()
        yield dst


def run_blockmirror_point(cfg: MatrixConfig, rate: float, repetition: int,
                          workdir: Path, converge: str | None = None) -> Row:
    """One sync of a fresh image under writers at RATE bytes/s (with CONVERGE,
    default the first of cfg's strategies)."""
    converge = converge or cfg.strategies[0]
    folder = workdir / f"bm-{converge}-{rate / MiB:g}M-{repetition}"
    shutil.rmtree(folder, ignore_errors=True)
    image, allocated = make_source(folder / "src", cfg, cfg.seed + repetition, tracked=True)
    try:
        with destination(cfg, folder) as dst_dir:
            return _blockmirror_point(cfg, rate, repetition, converge, image, allocated,
                                      dst_dir)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _blockmirror_point(cfg: MatrixConfig, rate: float, repetition: int, converge: str,
                       image: Path, allocated: int, dst_dir: Path) -> Row:
    from blockmirror.errors import NotConvergedError
    from blockmirror.migration import sync

    strategy, defer = split_strategy(converge)
    defer = defer or cfg.defer_hot
    row = _base_row("blockmirror", cfg, rate, repetition)
    row.update(allocated_bytes=allocated, converge=strategy, defer_hot=defer,
               label=f"blockmirror {converge}")
    writers = start_writers(image, rate, cfg, cfg.seed + repetition,
                            image.parent.parent)
    policy = PolicyLog()
    result = None
    error: BaseException | None = None
    writers_alive = False
    try:
        writers.wait_attached(image)
        time.sleep(cfg.warmup_s)
        writers.check_alive()
        mono0, t0 = time.monotonic(), time.perf_counter()
        try:
            with observe_policy() as policy:
                result = sync(image, dst_dir, target_downtime=cfg.target_downtime,
                              max_passes=cfg.max_passes, verify=cfg.verify,
                              workers=cfg.copy_workers, rate_limit=cfg.copy_cap,
                              converge=strategy, defer_hot=defer)
        except NotConvergedError as e:
            error = e
        t_end = time.perf_counter()
        mono_end = mono0 + (t_end - t0)
        passes = list(result.passes) if result is not None else list(policy.passes)
        decisions = policy.decisions
        decided = decisions[-1].at if decisions else t_end
        mono_decided = mono0 + (decided - t0)
        if error is not None:
            # The source side as sync promises it: nothing left behind,
            # writers neither frozen nor throttled, and still writing.
            time.sleep(0.3)
            row.update(_source_checks(image, dst_dir, writers))
        writers_alive = writers.alive()
    finally:
        writers.stop()
    row["writers_alive_at_end"] = writers_alive
    row["writer_rate"] = writers.rate_between(mono0, mono_decided) if rate > 0 else 0.0
    row["writer_rate_overall"] = writers.overall_rate
    row["writer_max_write_s"] = writers.max_write_s
    _mirrored_phase(row, writers, policy, mono0, t0, mono_decided)
    if error is not None and row.get("source_untouched"):
        after = writers.bytes_at(mono_end + 0.3) - writers.bytes_at(mono_end)
        row["writes_after_failure_bytes"] = after
        row["source_untouched"] = bool(after > 0 or rate <= 0)
    row["elapsed_s"] = t_end - t0
    row["decision_s"] = decided - t0
    row["decision"] = decisions[-1].decision if decisions else ""
    _fill_passes(row, passes)
    if result is not None:
        row.update(outcome="converged", converged=True, downtime_s=result.downtime,
                   bytes_copied=result.bytes_copied, verified=result.verified,
                   allocated_bytes=result.allocated_bytes, notes="; ".join(result.notes))
    else:
        row.update(outcome="not_converged", converged=False, downtime_s=0.0,
                   bytes_copied=sum(p["bytes"] for p in row["pass_list"]), verified=False,
                   notes=str(error))
    if result is not None:
        row.update(strategy=result.strategy, strategy_reason=result.strategy_reason)
    derive_row(row, cfg)
    return row


def _mirrored_phase(row: Row, writers: Writers, policy: PolicyLog, mono0: float, t0: float,
                    mono_decided: float) -> None:
    """What writers achieved, and their write latency p99, while mirroring
    was on (from its first engagement to the switchover decision or its
    stop, whichever came first)."""
    if not policy.mirror_on:
        row.update(mirror_s=None, mirror_writer_rate=None, mirror_write_p99_s=None)
        return
    on = mono0 + (policy.mirror_on[0] - t0)
    off = mono0 + (policy.mirror_off[-1] - t0) if policy.mirror_off else mono_decided
    off = min(off, mono_decided)
    p99 = getattr(writers, "latency_p99", None)
    row.update(mirror_from_s=on - mono0, mirror_s=max(0.0, off - on),
               mirror_writer_rate=writers.rate_between(on, off) if off > on else None,
               mirror_write_p99_s=p99(on, off) if p99 is not None else None)


def _source_checks(image: Path, dst_dir: Path, writers: Writers) -> Row:
    from blockmirror.tracking.tracker import Tracker

    left = sorted(p.name for p in dst_dir.iterdir())
    with Tracker.open(image) as tracker:
        info = tracker.info()
        consistent = tracker.consistent
    state = info.state
    throttle = info.throttle_bytes_per_s
    ok = not left and state == "running" and throttle == 0 and consistent and (
        writers.alive() or not writers.procs)
    return {"dst_left": ";".join(left), "tracker_state": state, "throttle_after": throttle,
            "sidecar_consistent": consistent, "source_untouched": ok}


def _base_row(engine: str, cfg: MatrixConfig, rate: float, repetition: int) -> Row:
    return {
        "engine": engine,
        "frontend": cfg.frontend if engine == "blockmirror" else "qemu-storage-daemon",
        "pattern": cfg.pattern, "rate_requested": rate,
        "rate_requested_mib": rate / MiB, "repetition": repetition, "writers": cfg.writers,
        "write_size": cfg.write_size, "granularity": cfg.granularity,
        "image_size": cfg.image_size, "copy_cap": cfg.copy_cap or 0,
        "target_downtime_s": cfg.target_downtime,
    }


def _fill_passes(row: Row, passes: Sequence[Any]) -> None:
    plist = []
    for p in passes:
        plist.append({"index": p.index, "kind": p.kind, "bytes": p.bytes,
                      "seconds": round(p.seconds, 6), "dirty_left": p.dirty_left,
                      "throughput": round(p.throughput, 1), "write_rate": round(p.write_rate, 1)})
    row["pass_list"] = plist
    row["passes"] = len(plist)
    row["dirty_passes"] = sum(1 for p in plist if p["kind"] == "dirty")
    bulk = [p for p in plist if p["kind"] == "bulk"]
    row["bulk_throughput"] = bulk[0]["throughput"] if bulk else 0.0
    # What the policy predicted for the final pass when it decided, and what
    # landed between that decision and the freeze.
    rounds = [p for p in passes if p.kind != "final"]
    finals = [p for p in plist if p["kind"] == "final"]
    if rounds and finals:
        from blockmirror.migration.policy import ConvergencePolicy

        c = ConvergencePolicy.copy_throughput(rounds)
        row["predicted_downtime_s"] = rounds[-1].dirty_left / c if c > 0 else None
        row["final_bytes"] = finals[-1]["bytes"]
        row["final_extra_bytes"] = finals[-1]["bytes"] - rounds[-1].dirty_left


def derive_row(row: Row, cfg: MatrixConfig) -> None:
    """Ratios, and the model fed with this run's own C and W."""
    size = row["image_size"]
    row["amplification"] = row["bytes_copied"] / size
    first = row["pass_list"][0]["bytes"] if row["pass_list"] else 0
    row["recopied_bytes"] = row["bytes_copied"] - first
    row["recopied_ratio"] = row["recopied_bytes"] / size
    row["switchover_s"] = row["decision_s"] if row["converged"] else None
    c = row.get("bulk_throughput") or (cfg.copy_cap or 0)
    # A: what the bulk pass copied (writers fill holes before the sync starts).
    allocated = first or row["allocated_bytes"]
    if c > 0:
        # A run that mirrored from its first dirty pass on is put next to the
        # mirrored model; auto, which may have mirrored later, to the passes.
        mirrored = row.get("converge") == "mirror" and row.get("strategy") == "mirror"
        pred = predict_row(cfg, allocated, c, row["writer_rate"],
                           mirror_writer_rate=row.get("mirror_writer_rate") if mirrored else None)
        row["model_converged"] = pred.converged
        row["model_reason"] = pred.reason
        row["model_passes"] = pred.passes
        row["model_switchover_s"] = pred.switchover_s
        row["model_bytes"] = pred.bytes_copied
        row["model_downtime_s"] = pred.downtime_s
        row["model_fixed_point"] = pred.fixed_point
        row["passes_minus_model"] = row["passes"] - pred.passes


def predict_row(cfg: MatrixConfig, allocated: float, copy_throughput: float,
                write_rate: float, *, mirror_writer_rate: float | None = None
                ) -> _model.Prediction:
    """The model's prediction for one point of CFG (mirrored passes with
    MIRROR_WRITER_RATE, see model.py)."""
    wl = _model.Workload(image_size=cfg.image_size, write_rate=max(0.0, write_rate),
                         write_size=cfg.write_size, pattern=cfg.pattern, writers=cfg.writers,
                         granularity=cfg.granularity, zipf_exponent=cfg.zipf_exponent)
    return _model.predict(wl, allocated=allocated, copy_throughput=copy_throughput,
                          target_downtime=cfg.target_downtime, max_passes=cfg.max_passes,
                          mirror_writer_rate=mirror_writer_rate)


# -- the matrix ---------------------------------------------------------------------------


def run_matrix(cfg: MatrixConfig, *, log: Log = print, command: str = "") -> MatrixResult:
    """Run every point of CFG, write the outputs, return everything."""
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    notes = [f"{platform.node()}: Linux {platform.release()}, Python "
             f"{platform.python_version()}, {os.cpu_count()} CPUs; writers, copier and "
             "harness share them, so expect noise: repeat points"]
    tree = _git_tree()
    if tree:
        notes.append(tree)
    notes.append(_frontend_note(cfg))
    own_workdir = cfg.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="bm-conv-")) if own_workdir else Path(cfg.workdir)  # type: ignore[arg-type]
    workdir.mkdir(parents=True, exist_ok=True)
    cfg.output.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    qemu = None
    if cfg.qemu:
        from . import qemu_peer

        missing = qemu_peer.missing_tools()
        if missing:
            msg = f"QEMU peer skipped: {missing}"
            log(msg)
            notes.append(msg)
        else:
            qemu = qemu_peer
    try:
        dest = destination_latencies(cfg, workdir, log) if cfg.dest_bandwidth else {}
        for repetition in range(cfg.repetitions):
            for rate in cfg.rates:
                # All engines back to back at each point (ANCHORS: same run).
                rows += _run_point(cfg, rate, repetition, workdir, qemu, log)
        for row in rows:
            row.update(dest.get(row["rate_requested"], {}))
    finally:
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    from . import report

    return report.finish(cfg, rows, notes=notes, started=started, command=command, log=log)


def _run_point(cfg: MatrixConfig, rate: float, repetition: int, workdir: Path,
               qemu: Any, log: Log) -> list[Row]:
    """Every engine at one point, back to back."""
    runs: list[tuple[str, Callable[..., Row], str]] = [
        (f"blockmirror {c}", functools.partial(run_blockmirror_point, converge=c),
         "blockmirror") for c in cfg.strategies]
    if qemu is not None:
        runs.append(("qemu-mirror", qemu.run_point, "qemu-mirror"))
        if cfg.qemu_wb:
            runs.append(("qemu-wb", functools.partial(qemu.run_point, write_blocking=True),
                         "qemu-wb"))
    rows = []
    for label, fn, engine in runs:
        log(f"{label:18s} rate {rate / MiB:6.1f} MiB/s  rep {repetition + 1}/"
            f"{cfg.repetitions} ...")
        rows.append(_guarded(fn, cfg, rate, repetition, workdir, engine))
        rows[-1].setdefault("label", label)
        log("  " + _one_line(rows[-1]))
    return rows


def destination_latencies(cfg: MatrixConfig, workdir: Path, log: Log) -> dict[float, Row]:
    """The destination's own write latency at each rate of the matrix: fio
    alone on a fresh slow disk (buffered 64 KiB-class pwrites at that rate, as
    the copier and the mirrored writes do), p99 and what it achieved."""
    out: dict[float, Row] = {}
    if shutil.which("fio") is None:
        log("destination latency not measured: fio not installed")
        return out
    for rate in cfg.rates:
        folder = workdir / f"dest-{rate / MiB:g}M"
        with destination(cfg, folder) as dst:
            out[rate] = fio_destination(cfg, rate, dst)
        shutil.rmtree(folder, ignore_errors=True)
        got = out[rate]
        log(f"destination alone at {rate / MiB:g} MiB/s: got "
            f"{(got['dest_write_rate'] or 0) / MiB:.1f} MiB/s, write p99 "
            f"{(got['dest_write_p99_s'] or 0) * 1000:.2f} ms")
    return out


DEST_FIO_SECONDS = 4


def fio_destination(cfg: MatrixConfig, rate: float, dst: Path) -> Row:
    """fio psync random writes of cfg.write_size into a cfg.image_size file
    in DST at RATE (0: as fast as it goes), one job per writer."""
    report = dst / "fio.json"
    argv = ["fio", "--name=dest", "--ioengine=psync", "--rw=randwrite", "--norandommap",
            "--randrepeat=0", f"--bs={cfg.write_size}", f"--size={cfg.image_size}",
            f"--filename={dst / 'probe.img'}", f"--numjobs={cfg.writers}", "--time_based",
            f"--runtime={DEST_FIO_SECONDS}", "--group_reporting", "--output-format=json",
            f"--output={report}"]
    if rate > 0:
        argv.append(f"--rate={max(1, int(rate / cfg.writers))}")
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   timeout=DEST_FIO_SECONDS * 10 + 60)
    from .qemu_peer import fio_write_stats

    bw, p99 = fio_write_stats(report)
    return {"dest_write_rate": bw, "dest_write_p99_s": p99}


def frontend_missing(cfg: MatrixConfig) -> str | None:
    """Why --frontend nbd cannot run here, or None."""
    if cfg.frontend != "nbd":
        return None
    from bench.nbd import servers

    from . import qemu_peer

    return servers.missing("blockmirror") or qemu_peer.fio_nbd_missing()


def _frontend_note(cfg: MatrixConfig) -> str:
    if cfg.frontend == "nbd":
        return (f"blockmirror's writers: fio --ioengine=nbd, {cfg.writers} jobs (connections) "
                "at rate/N, iodepth 8, against blockmirror serve (nbdkit + the plugin, unix "
                "socket) - the QEMU peer's guest command")
    return (f"blockmirror's writers: {cfg.writers} Python processes writing through "
            "TrackedImage (blockmirror.cli.workload)")


def _git_tree() -> str:
    """Which code was measured: HEAD, and whether the working tree had changes."""
    root = Path(__file__).resolve().parent.parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return ""
    if not head:
        return ""
    changed = [line[3:] for line in dirty if line.strip()]
    return f"code: git {head}" + (f" plus uncommitted changes to {', '.join(changed)}"
                                  if changed else "")


def _guarded(fn: Callable[..., Row], cfg: MatrixConfig, rate: float, repetition: int,
             workdir: Path, engine: str) -> Row:
    """A failing point becomes an "error" row; the matrix goes on."""
    try:
        return fn(cfg, rate, repetition, workdir)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # reported in the row
        row = _base_row(engine, cfg, rate, repetition)
        row.update(outcome="error", converged=False, notes=f"{type(e).__name__}: {e}",
                   passes=0, pass_list=[])
        return row


def _one_line(row: Row) -> str:
    if row["outcome"] == "error":
        return f"ERROR {row['notes']}"
    parts = [row["outcome"], f"writers {row.get('writer_rate', 0) / MiB:.1f} MiB/s"]
    if row["engine"] == "blockmirror":
        parts += [f"passes {row['passes']} (model {row.get('model_passes', '?')})",
                  f"decided at {row['decision_s']:.2f} s",
                  f"copied {row['amplification']:.2f}x image",
                  f"downtime {row['downtime_s'] * 1000:.0f} ms"]
        if not row["converged"]:
            parts.append(f"source untouched: {row.get('source_untouched')}")
        if row.get("strategy"):
            parts.append(f"by {row['strategy']}")
        if row.get("mirror_writer_rate") is not None:
            p99 = row.get("mirror_write_p99_s")
            parts.append(f"mirrored {row['mirror_s']:.1f} s: writers "
                         f"{row['mirror_writer_rate'] / MiB:.1f} MiB/s, p99 "
                         + (f"{p99 * 1000:.1f} ms" if p99 is not None else "-"))
    else:
        ready = row.get("ready_s")
        parts += [f"ready at {ready:.2f} s" if ready is not None else "never ready",
                  f"copied {row.get('amplification', 0):.2f}x image",
                  f"complete {row.get('downtime_s', 0) * 1000:.0f} ms"]
        if row.get("mirror_writer_rate") is not None:
            p99 = row.get("mirror_write_p99_s")
            parts.append(f"guest {row['mirror_writer_rate'] / MiB:.1f} MiB/s while mirroring, "
                         "p99 " + (f"{p99 * 1000:.1f} ms" if p99 is not None else "-"))
    return ", ".join(parts)


# -- command line ---------------------------------------------------------------------------------


def _size(text: str) -> int:
    from blockmirror.units import size_argument

    return size_argument(text)


def _granularity(text: str) -> int:
    value = _size(text)
    if value < 4 * KiB or value > 64 * MiB or value & (value - 1):
        raise argparse.ArgumentTypeError(
            f"granularity must be a power of two from 4k to 64M, got {text!r}")
    return value


def _rates(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of MiB/s values: {text!r}") from None
    if not values or any(not math.isfinite(v) or v < 0 or v > 1 << 24 for v in values):
        raise argparse.ArgumentTypeError("rates must be finite numbers from 0 to 16777216 MiB/s")
    return [v * MiB for v in values]


def _int_from(low: int, high: int = 1_000_000) -> Callable[[str], int]:
    from blockmirror.units import int_argument

    return int_argument(low, high)


def _float_in(low: float, high: float, *, low_open: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value) or value < low or value > high or (
            low_open and value == low
        ):
            lower = f"above {low:g} and at most" if low_open else f"from {low:g} to"
            raise argparse.ArgumentTypeError(f"must be {lower} {high:g}: {text!r}")
        return value
    return parse


def _duration(text: str) -> float:
    from blockmirror.units import parse_duration

    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser(prog: str = "blockmirror bench convergence") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Convergence versus write rate: sync a live image under writers at each "
        "rate, against the analytical pre-copy model and (with --qemu) QEMU's block mirror. "
        "Writes runs.csv, runs.json, summary.csv, summary.md, model.json and PNG plots.",
    )
    p.add_argument("--size", type=_size, default=256 * MiB, help="image size (default 256M)")
    p.add_argument("--allocated", type=_float_in(0.0, 1.0, low_open=True),
                   default=0.5, metavar="FRACTION",
                   help="fraction of the image holding data (default 0.5)")
    p.add_argument("--granularity", type=_granularity, default=64 * KiB,
                   help="tracking granularity (default 64k)")
    p.add_argument("--rates", type=_rates, default=[r * MiB for r in DEFAULT_RATES_MIB],
                   help="write rates in MiB/s, comma separated (default "
                   f"{','.join(str(r) for r in DEFAULT_RATES_MIB)})")
    p.add_argument("--pattern", choices=_model.PATTERNS, default="uniform")
    p.add_argument("--zipf-exponent", type=_float_in(0.0, 100.0, low_open=True),
                   default=_model.DEFAULT_ZIPF_EXPONENT)
    p.add_argument("--write-size", type=_size, default=64 * KiB, help="default 64k")
    p.add_argument("--writers", type=_int_from(1, 64), default=2,
                   help="writer processes (default 2)")
    p.add_argument("--target-downtime", type=_duration, default=0.5,
                   help="e.g. 500ms, 2s (default 500ms)")
    p.add_argument("--copy-cap", type=_float_in(0.0, float(1 << 24)),
                   default=None, metavar="MIB_PER_S",
                   help="cap on copy throughput in MiB/s, 0 for none (default 64, or none "
                   "with --dest-bandwidth)")
    p.add_argument("--dest-bandwidth", type=_float_in(0.0, float(1 << 24), low_open=True),
                   metavar="MIB_PER_S",
                   help="put the copy (and QEMU's target) on a disk whose writes run at "
                   "this rate for everyone (root: loop device, blkio throttle)")
    p.add_argument("--copy-workers", type=_int_from(1, 64), default=4,
                   help="sync's copy worker threads (default 4)")
    p.add_argument("--repetitions", type=_int_from(1), default=1)
    p.add_argument("--seed", type=_int_from(0, 2**63 - 1), default=1)
    p.add_argument("--max-passes", type=_int_from(1), default=DEFAULT_MAX_PASSES,
                   help=f"sync's max_passes (default {DEFAULT_MAX_PASSES})")
    p.add_argument("--converge", type=_strategies, default="fail",
                   help="sync's answer when writes outpace the copy: fail (default), "
                   "throttle, mirror, auto, or several comma separated (each its own "
                   "engine row; NAME+defer adds hot-block deferral to one); with "
                   "throttle, read the writers' achieved rate: that is what they paid")
    p.add_argument("--defer-hot", action="store_true", help="sync's hot-block deferral")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                   help="output folder (default bench/results/convergence in the repository)")
    p.add_argument("--workdir", type=Path,
                   help="where the images go (default: a temporary folder, removed)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip sync's verify after a switchover")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--rebuild", action="store_true",
                   help="run nothing: re-render summary, CSV, targets and plots from "
                   "OUTPUT/runs.json")
    p.add_argument("--qemu", action="store_true",
                   help="also run every point against QEMU's block mirror (needs "
                   "qemu-storage-daemon, fio with the nbd engine, qemu-img)")
    p.add_argument("--frontend", choices=FRONTENDS, default="python",
                   help="blockmirror's writers: python (processes writing through "
                   "TrackedImage, default) or nbd (the QEMU peer's fio guest command against "
                   "blockmirror serve; needs nbdkit, fio and the built plugin)")
    p.add_argument("--qemu-wb", action="store_true",
                   help="with --qemu: also QEMU's copy-mode=write-blocking (engine qemu-wb)")
    p.add_argument("--qemu-timeout", type=_float_in(0.0, 86400.0, low_open=True),
                   default=30.0, metavar="SECONDS",
                   help="give QEMU this long to become ready (default 30)")
    return p


def _strategies(text: str) -> str:
    names = [c for c in text.replace(" ", "").split(",") if c]
    bad = [c for c in names if split_strategy(c)[0] not in CONVERGE_CHOICES]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"one or more of {', '.join(CONVERGE_CHOICES)} (each optionally +defer), comma "
            f"separated: {text!r}")
    return ",".join(names)


def _copy_cap(mib: float | None, dest_bandwidth: float | None) -> float | None:
    """Bytes/s: 64 MiB/s by default, none by default on a slow destination
    (copies and mirrored writes share its bandwidth, as on a real disk)."""
    if mib is None:
        mib = 0.0 if dest_bandwidth else 64.0
    return mib * MiB if mib > 0 else None


def config_from_args(args: argparse.Namespace) -> MatrixConfig:
    return MatrixConfig(
        image_size=args.size, allocated_fraction=args.allocated, granularity=args.granularity,
        rates=args.rates, pattern=args.pattern, write_size=args.write_size,
        writers=args.writers, target_downtime=args.target_downtime,
        copy_cap=_copy_cap(args.copy_cap, args.dest_bandwidth),
        dest_bandwidth=args.dest_bandwidth * MiB if args.dest_bandwidth else None,
        defer_hot=args.defer_hot, qemu_wb=args.qemu_wb, copy_workers=args.copy_workers,
        repetitions=args.repetitions, seed=args.seed, output=args.output,
        max_passes=args.max_passes, verify=not args.no_verify, converge=args.converge,
        zipf_exponent=args.zipf_exponent, qemu=args.qemu, qemu_timeout_s=args.qemu_timeout,
        workdir=args.workdir, plots=not args.no_plots, frontend=args.frontend,
    )


def main(argv: Sequence[str] | None = None, prog: str = "blockmirror bench convergence") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    command = shlex.join([*prog.split(), *(sys.argv[1:] if argv is None else argv)])
    from . import report

    if args.rebuild:
        try:
            result = report.rebuild(cfg.output)
        except FileNotFoundError:
            parser.exit(2, f"{parser.prog}: error: no runs.json in {cfg.output} to rebuild "
                        "from\n")
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            # json.JSONDecodeError is a ValueError; a runs.json of the wrong
            # shape fails as one of the others.
            parser.exit(2, f"{parser.prog}: error: {cfg.output / 'runs.json'} is not a "
                        f"runs.json this harness wrote ({type(e).__name__}: {e})\n")
    else:
        why = frontend_missing(cfg)
        if why:
            parser.exit(2, f"{parser.prog}: error: --frontend nbd cannot run: {why}\n")
        result = run_matrix(cfg, command=command)
    print(f"\n{report.summary_markdown(result)}")
    print("wrote " + ", ".join(str(p) for p in result.files.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
