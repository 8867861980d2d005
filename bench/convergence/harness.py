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
    converge: str = "fail"  # sync's answer when writes outpace the copy: fail | throttle
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
        self.output = Path(self.output)

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
        yield log
    finally:
        setattr(options_module, "ConvergencePolicy", base)  # noqa: B010


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


def run_blockmirror_point(cfg: MatrixConfig, rate: float, repetition: int,
                          workdir: Path) -> Row:
    """One sync of a fresh image under writers at RATE bytes/s."""
    from blockmirror.errors import NotConvergedError
    from blockmirror.migration import sync

    folder = workdir / f"bm-{rate / MiB:g}M-{repetition}"
    shutil.rmtree(folder, ignore_errors=True)
    image, allocated = make_source(folder / "src", cfg, cfg.seed + repetition, tracked=True)
    dst_dir = folder / "dst"
    dst_dir.mkdir()
    row = _base_row("blockmirror", cfg, rate, repetition)
    row["allocated_bytes"] = allocated
    writers = start_writers(image, rate, cfg, cfg.seed + repetition, folder)
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
                              converge=cfg.converge)
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
    derive_row(row, cfg)
    shutil.rmtree(folder, ignore_errors=True)
    return row


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
        pred = predict_row(cfg, allocated, c, row["writer_rate"])
        row["model_converged"] = pred.converged
        row["model_reason"] = pred.reason
        row["model_passes"] = pred.passes
        row["model_switchover_s"] = pred.switchover_s
        row["model_bytes"] = pred.bytes_copied
        row["model_downtime_s"] = pred.downtime_s
        row["model_fixed_point"] = pred.fixed_point
        row["passes_minus_model"] = row["passes"] - pred.passes


def predict_row(cfg: MatrixConfig, allocated: float, copy_throughput: float,
                write_rate: float) -> _model.Prediction:
    """The model's prediction for one point of CFG."""
    wl = _model.Workload(image_size=cfg.image_size, write_rate=max(0.0, write_rate),
                         write_size=cfg.write_size, pattern=cfg.pattern, writers=cfg.writers,
                         granularity=cfg.granularity, zipf_exponent=cfg.zipf_exponent)
    return _model.predict(wl, allocated=allocated, copy_throughput=copy_throughput,
                          target_downtime=cfg.target_downtime, max_passes=cfg.max_passes)


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
        for repetition in range(cfg.repetitions):
            for rate in cfg.rates:
                # Both engines back to back at each point (ANCHORS: same run).
                log(f"blockmirror  rate {rate / MiB:6.1f} MiB/s  rep {repetition + 1}/"
                    f"{cfg.repetitions} ...")
                rows.append(_guarded(run_blockmirror_point, cfg, rate, repetition, workdir,
                                     "blockmirror"))
                log("  " + _one_line(rows[-1]))
                if qemu is not None:
                    log(f"qemu-mirror  rate {rate / MiB:6.1f} MiB/s  rep {repetition + 1}/"
                        f"{cfg.repetitions} ...")
                    rows.append(_guarded(qemu.run_point, cfg, rate, repetition, workdir,
                                         "qemu-mirror"))
                    log("  " + _one_line(rows[-1]))
    finally:
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    from . import report

    return report.finish(cfg, rows, notes=notes, started=started, command=command, log=log)


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
    else:
        ready = row.get("ready_s")
        parts += [f"ready at {ready:.2f} s" if ready is not None else "never ready",
                  f"copied {row.get('amplification', 0):.2f}x image",
                  f"complete {row.get('downtime_s', 0) * 1000:.0f} ms"]
    return ", ".join(parts)


# -- command line ---------------------------------------------------------------------------------


def _size(text: str) -> int:
    from blockmirror.units import parse_size

    try:
        value = parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


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
                   default=64.0, metavar="MIB_PER_S",
                   help="cap on copy throughput in MiB/s, 0 for none (default 64)")
    p.add_argument("--repetitions", type=_int_from(1), default=1)
    p.add_argument("--seed", type=_int_from(0, 2**63 - 1), default=1)
    p.add_argument("--max-passes", type=_int_from(1), default=DEFAULT_MAX_PASSES,
                   help=f"sync's max_passes (default {DEFAULT_MAX_PASSES})")
    p.add_argument("--converge", choices=("fail", "throttle"), default="fail",
                   help="sync's answer when writes outpace the copy (default fail); with "
                   "throttle, read the writers' achieved rate: that is what they paid")
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
    p.add_argument("--qemu-timeout", type=_float_in(0.0, 86400.0, low_open=True),
                   default=30.0, metavar="SECONDS",
                   help="give QEMU this long to become ready (default 30)")
    return p


def config_from_args(args: argparse.Namespace) -> MatrixConfig:
    return MatrixConfig(
        image_size=args.size, allocated_fraction=args.allocated, granularity=args.granularity,
        rates=args.rates, pattern=args.pattern, write_size=args.write_size,
        writers=args.writers, target_downtime=args.target_downtime,
        copy_cap=args.copy_cap * MiB if args.copy_cap > 0 else None,
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
