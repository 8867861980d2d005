"""PNG plots of a matrix: measured points, the model on the same axes, and the
write rate = copy rate line.

matplotlib is optional (``pip install 'blockmirror[bench]'``); without it
:func:`make_plots` returns a message instead of files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .harness import MatrixResult

MiB = 1 << 20


@dataclass(frozen=True)
class Peer:
    """One QEMU engine's rows and how its points look."""

    name: str
    rows: list[dict[str, Any]]
    color: str
    marker: str


def _peers(result: MatrixResult) -> list[Peer]:
    """QEMU's background mirror and (--qemu-wb) its write-blocking mode."""
    looks = (("qemu-mirror", "QEMU mirror", "tab:orange", "s"),
             ("qemu-wb", "QEMU write-blocking", "tab:purple", "D"))
    peers = []
    for engine, name, color, marker in looks:
        rows = [r for r in result.rows if r["engine"] == engine and r["outcome"] != "error"]
        if rows:
            peers.append(Peer(name, rows, color, marker))
    return peers


def make_plots(result: MatrixResult) -> list[Path] | str:
    """Write the plots into the output folder; a message if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ("plots skipped: matplotlib is not installed "
                "(pip install matplotlib, or the 'bench' extra)")
    from .report import model_curves

    curves = model_curves(result)
    out = result.config.output
    c = result.copy_throughput
    bm = [r for r in result.rows if r["engine"] == "blockmirror" and r["outcome"] != "error"]
    peers = _peers(result)
    files = []
    specs = [
        ("convergence_time", "time to switchover decision (s)", _time_points),
        ("bytes_copied", "bytes copied ÷ image size", _bytes_points),
        ("downtime", "writers paused (ms)", _downtime_points),
        ("passes", "passes (bulk + dirty + final)", _passes_points),
    ]
    for name, ylabel, fill in specs:
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
        fill(ax, bm, peers, curves, result)
        if c > 0:
            ax.axvline(c / MiB, color="tab:red", lw=1, ls="--",
                       label=f"write rate = copy rate ({c / MiB:.0f} MiB/s)")
            ax.axvline(0.8 * c / MiB, color="tab:red", lw=0.6, ls=":", label="0.8 x copy rate")
        ax.set_xlabel("writers' achieved rate during the copy (MiB/s)")
        ax.set_ylabel(ylabel)
        cfg = result.config
        ax.set_title(f"{cfg.pattern}, {cfg.image_size / MiB:g} MiB image "
                     f"({cfg.allocated_fraction:g} allocated), target "
                     f"{cfg.target_downtime:g} s"
                     + (", writers: fio over blockmirror serve" if cfg.frontend == "nbd" else ""),
                     fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path)
        plt.close(fig)
        files.append(path)
    if any(r.get("mirror_writer_rate") is not None for r in result.rows):
        files.append(_mirrored_writers(plt, result))
    return files


def _mirrored_writers(plt: Any, result: MatrixResult) -> Path:
    """Issue 10: what writers got while mirroring, against what they asked."""
    from .issue10 import label

    cfg = result.config
    d = (cfg.dest_bandwidth or result.copy_throughput) / MiB
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    rows = [r for r in result.rows if r.get("mirror_writer_rate") is not None
            and r["rate_requested"] > 0]
    for i, name in enumerate(sorted({label(r) for r in rows})):
        mine = [r for r in rows if label(r) == name]
        ax.scatter([r["rate_requested"] / MiB for r in mine],
                   [r["mirror_writer_rate"] / MiB for r in mine], s=20, zorder=3,
                   marker="os^vD"[i % 5], label=name)
    ax.axhline(d, color="tab:red", lw=1, ls="--", label=f"destination bandwidth D ({d:.0f})")
    ax.axhline(d / 2, color="tab:green", lw=1, ls=":", label="target: 0.5 x D")
    ax.set_xlabel("writers asked (MiB/s)")
    ax.set_ylabel("writers got while mirroring (MiB/s)")
    ax.set_title(f"{cfg.pattern}, {cfg.image_size / MiB:g} MiB image, writes to a "
                 f"{d:.0f} MiB/s destination", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = cfg.output / "mirrored_writers.png"
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def _x(rows: list[dict[str, Any]]) -> list[float]:
    return [r.get("writer_rate", 0.0) / MiB for r in rows]


def _model_line(ax: Any, curves: dict[str, Any], key: str, scale: float = 1.0,
                label: str = "model") -> None:
    if not curves:
        return
    xs, ys = [], []
    for rate, ok, y in zip(curves["rate"], curves["converged"], curves[key], strict=True):
        xs.append(rate / MiB)
        ys.append(y * scale if ok else math.nan)
    ax.plot(xs, ys, color="tab:gray", lw=1.5, label=label)
    # where the model does not converge: shade
    bad = [x for x, ok in zip(xs, curves["converged"], strict=True) if not ok]
    if bad:
        ax.axvspan(min(bad), max(bad), color="tab:gray", alpha=0.12,
                   label="model: not converged")


def _time_points(ax: Any, bm: list[Any], peers: list[Peer], curves: dict[str, Any],
                 result: MatrixResult) -> None:
    _model_line(ax, curves, "switchover_s")
    ok = [r for r in bm if r["converged"]]
    no = [r for r in bm if not r["converged"]]
    ax.scatter(_x(ok), [r["decision_s"] for r in ok], color="tab:blue", s=18,
               label="blockmirror: switchover", zorder=3)
    if no:
        ax.scatter(_x(no), [r["decision_s"] for r in no], color="tab:blue", marker="x", s=30,
                   label="blockmirror: not converged (declared at)", zorder=3)
    for peer in peers:
        qok = [r for r in peer.rows if r.get("ready_s") is not None]
        qno = [r for r in peer.rows if r.get("ready_s") is None]
        ax.scatter(_x(qok), [r["ready_s"] for r in qok], color=peer.color, marker=peer.marker,
                   s=18, label=f"{peer.name}: ready", zorder=3)
        if qno:
            ax.scatter(_x(qno), [result.config.qemu_timeout_s for _ in qno], color=peer.color,
                       marker="^", s=30, label=f"{peer.name}: never ready (limit)", zorder=3)


def _bytes_points(ax: Any, bm: list[Any], peers: list[Peer], curves: dict[str, Any],
                  result: MatrixResult) -> None:
    size = result.config.image_size
    _model_line(ax, curves, "bytes_copied", 1.0 / size)
    ok = [r for r in bm if r["converged"]]
    no = [r for r in bm if not r["converged"]]
    ax.scatter(_x(ok), [r["amplification"] for r in ok], color="tab:blue", s=18,
               label="blockmirror", zorder=3)
    if no:
        ax.scatter(_x(no), [r["amplification"] for r in no], color="tab:blue", marker="x",
                   s=30, label="blockmirror: not converged (copied until declared)", zorder=3)
    for peer in peers:
        ax.scatter(_x(peer.rows), [r["amplification"] for r in peer.rows], color=peer.color,
                   marker=peer.marker, s=18, label=f"{peer.name} (counts holes too)", zorder=3)


def _downtime_points(ax: Any, bm: list[Any], peers: list[Peer], curves: dict[str, Any],
                     result: MatrixResult) -> None:
    _model_line(ax, curves, "downtime_s", 1000.0)
    ok = [r for r in bm if r["converged"]]
    ax.scatter(_x(ok), [r["downtime_s"] * 1000 for r in ok], color="tab:blue", s=18,
               label="blockmirror (freeze to thaw)", zorder=3)
    ax.scatter(_x(ok), [r.get("writer_max_write_s", 0) * 1000 for r in ok], color="tab:blue",
               marker="v", s=14, alpha=0.5, label="blockmirror: longest write seen", zorder=3)
    for peer in peers:
        qok = [r for r in peer.rows if r["converged"]]
        if qok:
            ax.scatter(_x(qok), [r["downtime_s"] * 1000 for r in qok], color=peer.color,
                       marker=peer.marker, s=18, label=f"{peer.name}: job-complete", zorder=3)
    ax.axhline(result.config.target_downtime * 1000, color="tab:green", lw=1,
               label="target downtime")


def _passes_points(ax: Any, bm: list[Any], peers: list[Peer], curves: dict[str, Any],
                   result: MatrixResult) -> None:
    if curves:
        ax.plot([r / MiB for r in curves["rate"]], curves["passes"], color="tab:gray", lw=1.5,
                label="model (at the median C)")
    ok = [r for r in bm if r["converged"]]
    no = [r for r in bm if not r["converged"]]
    ax.scatter(_x(ok), [r["passes"] for r in ok], color="tab:blue", s=18,
               label="blockmirror: converged", zorder=3)
    if no:
        ax.scatter(_x(no), [r["passes"] for r in no], color="tab:blue", marker="x", s=30,
                   label="blockmirror: not converged", zorder=3)
    with_model = [r for r in bm if "model_passes" in r]
    ax.scatter(_x(with_model), [r["model_passes"] for r in with_model], facecolors="none",
               edgecolors="tab:gray", s=30, label="model at each run's own C and W", zorder=2)
