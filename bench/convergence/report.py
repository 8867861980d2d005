"""What a matrix says: medians, target verdicts, side-by-side table, files.

Everything here works from the rows alone, so :func:`rebuild` can re-render a
finished run (``runs.json``) with newer report code without running anything.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .harness import (
    COMPARABLE_RATE_SHARE,
    KiB,
    Log,
    MatrixConfig,
    MatrixResult,
    MiB,
    Row,
    predict_row,
)


def measured_copy_throughput(rows: Sequence[Row], cfg: MatrixConfig) -> float:
    """C: the median bulk-pass throughput of blockmirror's rate-0 runs, else of
    all its runs, else the cap."""
    bm = [r for r in rows if r["engine"] == "blockmirror" and r.get("bulk_throughput")]
    idle = [r["bulk_throughput"] for r in bm if r["rate_requested"] == 0]
    values = idle or [r["bulk_throughput"] for r in bm]
    if values:
        return float(statistics.median(values))
    return float(cfg.copy_cap or 0.0)


# -- targets --------------------------------------------------------------------------------


def evaluate_targets(rows: Sequence[Row], cfg: MatrixConfig, c: float) -> dict[str, Any]:
    """Where the runs stand on each target of issue 4."""
    bm = [r for r in rows if r["engine"] == "blockmirror" and r["outcome"] != "error"]
    out: dict[str, Any] = {"copy_throughput": c}
    # 1. converges at every rate <= 0.8 C, downtime <= target
    low = [r for r in bm if r["writer_rate"] <= 0.8 * c]
    bad = [r for r in low if not (r["converged"] and r["downtime_s"] <= cfg.target_downtime)]
    out["converge_below_0.8C"] = {
        "runs": len(low), "failed": len(bad), "met": bool(low) and not bad,
        "worst_downtime_s": max((r["downtime_s"] for r in low if r["converged"]), default=None),
        "failures": [_ident(r) for r in bad],
    }
    # 2. passes within +-1 of the model
    with_model = [r for r in bm if "model_passes" in r]
    off = [r for r in with_model if abs(r["passes"] - r["model_passes"]) > 1]
    out["passes_vs_model"] = {
        "runs": len(with_model), "outside_1": len(off), "met": bool(with_model) and not off,
        "outside": [f"{_ident(r)}: {r['passes']} vs model {r['model_passes']}" for r in off],
    }
    # 3. past the copy rate: declared within 3 dirty passes, source untouched
    high = [r for r in bm if r["writer_rate"] > c]
    failed = [r for r in high if not r["converged"]]
    slow = [r for r in failed if r["dirty_passes"] > 3]
    dirty_src = [r for r in failed if not r.get("source_untouched")]
    # Vacuous (n/a) when no run past C failed to converge: nothing to declare.
    met3 = (not slow and not dirty_src) if failed else None
    out["non_convergence_within_3"] = {
        "runs_past_C": len(high), "converged_anyway": len(high) - len(failed),
        "declared": len(failed), "declared_late": len(slow), "source_not_untouched":
        len(dirty_src), "met": met3,
        "late": [f"{_ident(r)}: {r['dirty_passes']} dirty passes ({r['decision']})"
                 for r in slow],
    }
    # 4. against QEMU at the same rate: bytes copied and time to switchover
    q = [r for r in rows if r["engine"] == "qemu-mirror" and r["outcome"] != "error"]
    if q:
        comparisons = []
        for rate in sorted({r["rate_requested"] for r in q}):
            b = [r for r in bm if r["rate_requested"] == rate]
            e = [r for r in q if r["rate_requested"] == rate]
            if not b or not e:
                continue
            comparisons.append(_compare_at(rate, b, e))
        fair = [x for x in comparisons if x["comparable"]]
        worse = [x for x in fair if not x["no_worse"]]
        out["vs_qemu"] = {"rates": len(comparisons), "comparable": len(fair),
                          "worse_at": [x["rate_mib"] for x in worse],
                          "slower_at": [x["rate_mib"] for x in fair if not x["time_no_worse"]],
                          "more_bytes_at": [x["rate_mib"] for x in fair
                                            if not x["bytes_no_worse"]],
                          "not_comparable_at": [x["rate_mib"] for x in comparisons
                                                if not x["comparable"]],
                          "met": bool(fair) and not worse, "points": comparisons}
    else:
        out["vs_qemu"] = {"met": None, "note": "QEMU peer not run (use --qemu)"}
    return out


def _compare_at(rate: float, bm: Sequence[Row], qm: Sequence[Row]) -> dict[str, Any]:
    """Medians at one rate. A run that never switched counts as infinitely slow.

    Bytes are compared as *re-copied* bytes (copied beyond the first full
    pass): QEMU's progress counts the image's holes, blockmirror skips them,
    so the totals differ by the holes alone. Time is blockmirror's switchover
    decision against QEMU's "ready"."""
    def med(values: list[float]) -> float | None:
        return float(statistics.median(values)) if values else None

    def med_time(values: list[float]) -> float:
        return float(statistics.median(values))

    bm_time = med_time([r["switchover_s"] if r["converged"] else math.inf for r in bm])
    q_time = med_time([r["ready_s"] if r.get("ready_s") is not None else math.inf for r in qm])
    q_pred = med([r["predicate_s"] for r in qm if r.get("predicate_s") is not None])
    bm_bytes = med([r["bytes_copied"] for r in bm if r["converged"]])
    q_bytes = med([r["bytes_copied"] for r in qm if r["converged"]])
    bm_re = med([r["recopied_bytes"] for r in bm if r["converged"]])
    q_re = med([r["recopied_bytes"] for r in qm if r["converged"]])
    bm_rate = med([r["writer_rate"] for r in bm]) or 0.0
    q_rate = med([r["writer_rate"] for r in qm]) or 0.0
    # A run that never switched is infinitely slow and copies without end.
    time_no_worse = bm_time <= q_time or (math.isinf(bm_time) and math.isinf(q_time))
    # (no converged run on one side: the bytes verdict follows the time verdict)
    bytes_no_worse = time_no_worse if bm_re is None or q_re is None else bm_re <= q_re
    no_worse = time_no_worse and bytes_no_worse
    return {"rate_mib": rate / MiB, "bm_writer_rate": bm_rate, "qemu_writer_rate": q_rate,
            "comparable": bm_rate >= COMPARABLE_RATE_SHARE * q_rate,
            "bm_switchover_s": bm_time, "qemu_ready_s": q_time, "qemu_predicate_s": q_pred,
            "bm_bytes": bm_bytes, "qemu_bytes": q_bytes, "bm_recopied": bm_re,
            "qemu_recopied": q_re, "time_no_worse": time_no_worse,
            "bytes_no_worse": bytes_no_worse, "no_worse": no_worse}


def _ident(r: Row) -> str:
    return (f"{r['engine']} {r['rate_requested'] / MiB:g} MiB/s rep {r['repetition']} "
            f"(writers {r.get('writer_rate', 0) / MiB:.1f})")


# -- outputs ----------------------------------------------------------------------------------

CSV_COLUMNS = [
    "engine", "pattern", "rate_requested_mib", "repetition", "writers", "writer_rate_mib",
    "writer_rate_overall_mib", "outcome", "converged", "decision", "passes", "dirty_passes",
    "decision_s", "switchover_s", "ready_s", "le_2mib_s", "predicate_s", "elapsed_s",
    "downtime_s", "predicted_downtime_s", "final_bytes", "final_extra_bytes",
    "writer_max_write_s", "bytes_copied", "amplification", "recopied_ratio",
    "allocated_bytes", "image_size", "bulk_throughput_mib", "copy_cap", "target_downtime_s",
    "verified", "identical", "source_untouched", "model_converged", "model_reason",
    "model_passes", "passes_minus_model", "model_switchover_s", "model_bytes",
    "model_downtime_s", "label", "converge", "defer_hot", "strategy", "strategy_reason",
    "mirror_from_s", "mirror_s", "mirror_writer_rate_mib", "mirror_write_p99_s",
    "dest_write_rate_mib", "dest_write_p99_s", "recopied_bytes", "pass_bytes",
    "pass_seconds", "pass_throughput_mib", "pass_dirty_left", "pass_write_rate_mib", "notes",
]


def _csv_row(row: Row) -> Row:
    out = {k: row.get(k) for k in CSV_COLUMNS}
    out["writer_rate_mib"] = _r(row.get("writer_rate", 0.0) / MiB)
    out["writer_rate_overall_mib"] = _r(row.get("writer_rate_overall", 0.0) / MiB)
    out["bulk_throughput_mib"] = _r((row.get("bulk_throughput") or 0.0) / MiB)
    for key in ("mirror_writer_rate", "dest_write_rate"):
        if row.get(key) is not None:
            out[f"{key}_mib"] = _r(row[key] / MiB)
    plist = row.get("pass_list") or []
    out["pass_bytes"] = ";".join(str(p["bytes"]) for p in plist)
    out["pass_seconds"] = ";".join(f"{p['seconds']:.4f}" for p in plist)
    out["pass_throughput_mib"] = ";".join(f"{p['throughput'] / MiB:.1f}" for p in plist)
    out["pass_dirty_left"] = ";".join(str(p["dirty_left"]) for p in plist)
    out["pass_write_rate_mib"] = ";".join(f"{p['write_rate'] / MiB:.1f}" for p in plist)
    for k, v in out.items():
        if isinstance(v, float):
            out[k] = _r(v)
    return out


def _r(x: float) -> float:
    return round(x, 6) if math.isfinite(x) else x


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def model_curves(result: MatrixResult, points: int = 81) -> dict[str, Any]:
    """The model over a fine grid of write rates, at the measured C, for plots."""
    cfg = result.config
    c = result.copy_throughput or (cfg.copy_cap or 0)
    if c <= 0:
        return {}
    allocated = statistics.median(
        [r["allocated_bytes"] for r in result.rows if r.get("allocated_bytes")] or
        [cfg.image_size * cfg.allocated_fraction])
    top = max(max(cfg.rates), max((r.get("writer_rate", 0) for r in result.rows), default=0))
    top = max(top, 1.2 * c)
    grid = [top * i / (points - 1) for i in range(points)]
    preds = [predict_row(cfg, allocated, c, w) for w in grid]
    return {
        "copy_throughput": c, "allocated": allocated,
        "rate": grid,
        "converged": [p.converged for p in preds],
        "reason": [p.reason for p in preds],
        "passes": [p.passes for p in preds],
        "switchover_s": [p.switchover_s for p in preds],
        "bytes_copied": [p.bytes_copied for p in preds],
        "downtime_s": [p.downtime_s for p in preds],
        "fixed_point": [p.fixed_point for p in preds],
    }


def summarize(rows: Sequence[Row]) -> list[Row]:
    """Medians per engine and requested rate (blockmirror's strategies apart
    when the matrix ran several)."""
    from .issue10 import label as full_label

    several = len({full_label(r) for r in rows if r["engine"] == "blockmirror"}) > 1

    def label(r: Row) -> str:
        return full_label(r) if several else str(r["engine"])

    out = []
    keys = sorted({(label(r), r["rate_requested"]) for r in rows},
                  key=lambda k: (not k[0].startswith("blockmirror"), k[0], k[1]))
    for engine, rate in keys:
        group = [r for r in rows if label(r) == engine and r["rate_requested"] == rate
                 and r["outcome"] != "error"]
        errors = sum(1 for r in rows if label(r) == engine and r["rate_requested"] == rate
                     and r["outcome"] == "error")
        ok = [r for r in group if r["converged"]]

        def med(key: str, rs: Sequence[Row] = group) -> float | None:
            vals = [r[key] for r in rs if r.get(key) is not None]
            return float(statistics.median(vals)) if vals else None

        out.append({
            "engine": engine, "rate_requested_mib": rate / MiB, "runs": len(group),
            "errors": errors, "converged": len(ok),
            "writer_rate_mib": (med("writer_rate") or 0.0) / MiB,
            "passes": med("passes"), "model_passes": med("model_passes"),
            "decision_s": med("decision_s"), "switchover_s": med("switchover_s", ok),
            "ready_s": med("ready_s"), "le_2mib_s": med("le_2mib_s"),
            "model_switchover_s": med("model_switchover_s"),
            "amplification": med("amplification"), "model_bytes_ratio":
            (med("model_bytes") or 0.0) / group[0]["image_size"] if group else None,
            "recopied_ratio": med("recopied_ratio"),
            "downtime_ms": (med("downtime_s", ok) or 0.0) * 1000 if ok else None,
            "model_downtime_ms": (med("model_downtime_s") or 0.0) * 1000,
            "writer_max_write_ms": (med("writer_max_write_s") or 0.0) * 1000,
            "bulk_throughput_mib": (med("bulk_throughput") or 0.0) / MiB,
            "source_untouched": all(r.get("source_untouched", True) for r in group
                                    if not r["converged"]),
        })
    return out


def write_outputs(result: MatrixResult) -> None:
    out = result.config.output
    out.mkdir(parents=True, exist_ok=True)
    runs_json = out / "runs.json"
    runs_json.write_text(json.dumps(_json_safe({
        "started": result.started, "command": result.command,
        "config": result.config.to_dict(), "copy_throughput": result.copy_throughput,
        "notes": result.notes, "targets": result.targets, "runs": result.rows,
    }), indent=1))
    runs_csv = out / "runs.csv"
    with open(runs_csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for row in result.rows:
            w.writerow(_csv_row(row))
    summary = summarize(result.rows)
    summary_csv = out / "summary.csv"
    with open(summary_csv, "w", newline="") as f:
        if summary:
            w2 = csv.DictWriter(f, fieldnames=list(summary[0]))
            w2.writeheader()
            for s in summary:
                w2.writerow({k: _r(v) if isinstance(v, float) else v for k, v in s.items()})
    model_json = out / "model.json"
    model_json.write_text(json.dumps(_json_safe(model_curves(result)), indent=1))
    result.files.update(runs_json=runs_json, runs_csv=runs_csv, summary_csv=summary_csv,
                        model_json=model_json)
    write_summary(result)


def _fmt(v: Any, spec: str = ".2f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "never"
        return format(v, spec)
    return str(v)


def summary_markdown(result: MatrixResult) -> str:
    cfg = result.config
    c = result.copy_throughput
    lines = [*_header_lines(result), *_engine_table(result.rows), *_target_lines(result.targets)]
    if cfg.dest_bandwidth or any(r.get("converge") in ("mirror", "auto") or r.get("defer_hot")
                                 or r["engine"] == "qemu-wb" for r in result.rows):
        from . import issue10

        lines += ["", *issue10.markdown(result.rows, cfg.dest_bandwidth or c,
                                        cfg.target_downtime, c)]
    plots = [p for k, p in result.files.items() if str(p).endswith(".png")]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def _header_lines(result: MatrixResult) -> list[str]:
    """Title, command, the matrix's settings and notes."""
    cfg = result.config
    c = result.copy_throughput
    return [
        f"# Convergence versus write rate ({result.started})",
        "",
        f"`{result.command}`" if result.command else "",
        "",
        f"Image {cfg.image_size / MiB:g} MiB, {cfg.allocated_fraction:g} allocated; "
        f"granularity {cfg.granularity / KiB:g} KiB; pattern {cfg.pattern}; "
        f"{cfg.writers} {'fio jobs' if cfg.frontend == 'nbd' else 'writer processes'}, "
        f"{cfg.write_size / KiB:g} KiB writes; target downtime "
        f"{cfg.target_downtime:g} s; copy cap "
        + (f"{cfg.copy_cap / MiB:g} MiB/s" if cfg.copy_cap else "none")
        + (f"; destination bandwidth {cfg.dest_bandwidth / MiB:g} MiB/s (slow disk)"
           if cfg.dest_bandwidth else "")
        + f"; {cfg.copy_workers} copy workers; measured copy throughput C = {c / MiB:.1f} MiB/s; "
        f"{cfg.repetitions} repetition(s); max passes {cfg.max_passes}.",
        "",
        *[f"- {n}" for n in result.notes],
        "",
    ]


def _engine_table(rows: list[Row]) -> list[str]:
    """The medians of every engine at every point, beside the model."""
    lines = [
        "Medians per point. passes = pass records incl. bulk and final; switch s = time "
        "to the switchover decision (QEMU: to \"ready\"); copied = bytes copied ÷ image size; "
        "downtime = writers paused (QEMU: job-complete with the guest disconnected); model = "
        "model.py fed the measured C and the writers' achieved rate.",
        "",
        "| engine | rate MiB/s | writers got MiB/s | converged | passes (model) | switch s "
        "(model) | copied ÷ image (model) | re-copied ÷ image | downtime ms (model) | longest "
        "write ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summarize(rows):
        qemu = not s["engine"].startswith("blockmirror")
        switch = s["ready_s"] if qemu else s["switchover_s"]
        lines.append(
            f"| {s['engine']} | {s['rate_requested_mib']:g} | {s['writer_rate_mib']:.1f} | "
            f"{s['converged']}/{s['runs']}{_errors(s['errors'])} | "
            + (f"- | {_fmt(switch)} (-) | {_fmt(s['amplification'])} (-) | "
               if qemu else
               f"{_fmt(s['passes'], '.0f')} ({_fmt(s['model_passes'], '.0f')}) | "
               f"{_fmt(switch)} ({_fmt(s['model_switchover_s'])}) | "
               f"{_fmt(s['amplification'])} ({_fmt(s['model_bytes_ratio'])}) | ")
            + f"{_fmt(s['recopied_ratio'])} | "
            + (f"{_fmt(s['downtime_ms'], '.1f')} (-) | " if qemu else
               f"{_fmt(s['downtime_ms'], '.1f')} ({_fmt(s['model_downtime_ms'], '.1f')}) | ")
            + f"{_fmt(s['writer_max_write_ms'], '.1f')} |"
        )
    return lines


def _target_lines(t: dict[str, Any]) -> list[str]:
    """The issue-4 targets' verdicts, and the QEMU side-by-side table."""
    lines = ["", "## Targets", ""]
    a = t["converge_below_0.8C"]
    lines.append(f"- converges at every rate ≤ 0.8 x C with downtime ≤ target: "
                 f"{_verdict(a['met'])} ({a['runs'] - a['failed']}/{a['runs']} runs; worst "
                 f"downtime {_fmt(a['worst_downtime_s'], '.3f')} s)"
                 + (f"; failed: {', '.join(a['failures'])}" if a["failures"] else ""))
    b = t["passes_vs_model"]
    lines.append(f"- passes within ±1 of the model: {_verdict(b['met'])} "
                 f"({b['runs'] - b['outside_1']}/{b['runs']} runs)"
                 + (f"; outside: {', '.join(b['outside'])}" if b["outside"] else ""))
    d = t["non_convergence_within_3"]
    lines.append(f"- non-convergence declared within 3 dirty passes past C, source untouched: "
                 f"{_verdict(d['met'])} ({d['runs_past_C']} runs past C: "
                 f"{d['converged_anyway']} converged anyway, {d['declared']} declared, "
                 f"{d['declared_late']} late, {d['source_not_untouched']} with the source "
                 "not as promised)" + (f"; late: {', '.join(d['late'])}" if d["late"] else ""))
    q = t["vs_qemu"]
    if q.get("met") is None:
        lines.append(f"- vs QEMU: {q['note']}")
    else:
        lines.append(
            f"- re-copied bytes and time to switchover no worse than QEMU's mirror: "
            f"{_verdict(q['met'])} ({q['comparable']} comparable rates"
            + (f"; slower at {', '.join(f'{x:g}' for x in q['slower_at'])} MiB/s"
               if q["slower_at"] else "; never slower")
            + (f"; more bytes re-copied at {', '.join(f'{x:g}' for x in q['more_bytes_at'])}"
               " MiB/s" if q["more_bytes_at"] else "; never more bytes re-copied")
            + (f"; not comparable (blockmirror's writers got < "
               f"{COMPARABLE_RATE_SHARE:.0%} of QEMU's guest rate) at "
               f"{', '.join(f'{x:g}' for x in q['not_comparable_at'])} MiB/s"
               if q["not_comparable_at"] else "") + ")")
        lines += ["", "Side by side (medians; QEMU's copied bytes count the image's holes, "
                  "blockmirror skips them, so compare the re-copied columns; \"QEMU predicate "
                  "s\" = first poll where remaining ÷ cap < target downtime):", "",
                  "| rate MiB/s | writers got: blockmirror / QEMU | blockmirror switch s | "
                  "QEMU ready s | QEMU predicate s | copied MiB: blockmirror / QEMU | "
                  "re-copied MiB: blockmirror / QEMU |",
                  "|---|---|---|---|---|---|---|"]
        for x in q["points"]:
            lines.append(
                f"| {x['rate_mib']:g} | {x['bm_writer_rate'] / MiB:.1f} / "
                f"{x['qemu_writer_rate'] / MiB:.1f} | {_fmt(x['bm_switchover_s'])} | "
                f"{_fmt(x['qemu_ready_s'])} | {_fmt(x['qemu_predicate_s'])} | "
                f"{_mib(x['bm_bytes'])} / {_mib(x['qemu_bytes'])} | "
                f"{_mib(x['bm_recopied'])} / {_mib(x['qemu_recopied'])} |")
    return lines


def _mib(v: float | None) -> str:
    return "-" if v is None else f"{v / MiB:.0f}"


def _errors(n: int) -> str:
    return f" (+{n} err)" if n else ""


def _verdict(met: bool | None) -> str:
    return "n/a" if met is None else ("MET" if met else "NOT MET")


def write_summary(result: MatrixResult) -> None:
    path = result.config.output / "summary.md"
    path.write_text(summary_markdown(result))
    result.files["summary_md"] = path


def finish(cfg: MatrixConfig, rows: list[Row], *, notes: list[str], started: str,
           command: str, log: Log = print) -> MatrixResult:
    """Targets, files and plots for the rows of a finished matrix."""
    c = measured_copy_throughput(rows, cfg)
    result = MatrixResult(cfg, rows, c, evaluate_targets(rows, cfg, c), {}, notes, started,
                          command)
    _write_all(result, log)
    return result


def _write_all(result: MatrixResult, log: Log) -> None:
    write_outputs(result)
    if result.config.plots:
        from . import plots

        made = plots.make_plots(result)
        if isinstance(made, str):
            log(made)
            result.notes.append(made)
        else:
            for path in made:
                result.files[path.stem] = path
    write_summary(result)  # again: with the plot files listed


def rebuild(output: Path, *, log: Log = print) -> MatrixResult:
    """Re-render the summaries, targets and plots from OUTPUT/runs.json with
    the current code, without running anything."""
    data = json.loads((Path(output) / "runs.json").read_text())
    fields = set(MatrixConfig.__dataclass_fields__)
    cfg_data = {k: v for k, v in data["config"].items() if k in fields}
    cfg_data["output"] = Path(output)
    cfg_data["workdir"] = None
    cfg = MatrixConfig(**cfg_data)
    rows = data["runs"]
    # The model is re-run with the current code, so a changed model can be
    # checked against runs already made.
    from .harness import derive_row
    from .qemu_peer import derive_recopied

    for row in rows:
        if row.get("engine") == "blockmirror" and row.get("pass_list"):
            derive_row(row, cfg)
        elif row.get("engine") in ("qemu-mirror", "qemu-wb") and "bytes_copied" in row:
            derive_recopied(row, cfg.image_size)
    c = measured_copy_throughput(rows, cfg)
    result = MatrixResult(cfg, rows, c, evaluate_targets(rows, cfg, c), {},
                          list(data.get("notes", [])), data.get("started", ""),
                          data.get("command", ""))
    _write_all(result, log)
    return result
