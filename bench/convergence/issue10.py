"""Issue 10's view of a matrix: mirrored writers, latency, strategy, verdicts.

Rows are grouped by *label* (``blockmirror mirror``, ``blockmirror auto``,
``blockmirror fail+defer``, ``qemu-mirror``, ``qemu-wb``) and requested rate.
D is the destination's bandwidth (``--dest-bandwidth``), else the measured
copy throughput C. Rates are classed by what was *asked* of the writers
(1.5 x D and up: "past D"; at most 0.5 x D: "low"; 0.7-0.9 x D: "0.8 x").

Everything works from the rows alone, so ``--rebuild`` re-renders it.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

MiB = 1 << 20
Row = dict[str, Any]
BLOCKMIRROR_ACTIVE = ("blockmirror mirror", "blockmirror auto")
LOW_DOWNTIME_FLOOR_S = 0.020


def label(row: Row) -> str:
    return str(row.get("label") or row["engine"])


def _med(rows: Sequence[Row], key: str) -> float | None:
    vals = [float(r[key]) for r in rows if r.get(key) is not None]
    return float(statistics.median(vals)) if vals else None


def groups(rows: Sequence[Row]) -> dict[tuple[str, float], list[Row]]:
    out: dict[tuple[str, float], list[Row]] = {}
    for r in rows:
        if r["outcome"] != "error":
            out.setdefault((label(r), float(r["rate_requested"])), []).append(r)
    return out


def kept_rate(r: Row) -> float | None:
    """What writers achieved while mirroring was on, else (no mirrored
    phase, e.g. auto went to the throttle) during the whole copy."""
    mirrored = r.get("mirror_writer_rate")
    return float(mirrored) if mirrored is not None else r.get("writer_rate")


def table(rows: Sequence[Row], d: float) -> list[str]:
    """One line per label and rate: medians, with every run's strategy."""
    lines = [
        "| engine | asked MiB/s (÷ D) | converged | strategy | downtime ms | switch / ready s "
        "| writers got MiB/s (whole copy) | mirrored phase s | writers while mirroring MiB/s "
        "(÷ D) | writer p99 ms | destination alone p99 ms | re-copied MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = sorted(groups(rows).items(), key=lambda kv: (kv[0][1], not kv[0][0].startswith(
        "blockmirror"), kv[0][0]))
    for (name, rate), rs in order:
        ok = [r for r in rs if r["converged"]]
        kept = _med(rs, "mirror_writer_rate")
        switch = _med(ok, "switchover_s")
        strategies = ",".join(sorted({str(r.get("strategy")) for r in ok if r.get("strategy")}))
        lines.append(
            f"| {name} | {rate / MiB:g} ({rate / d:.2f}) | {len(ok)}/{len(rs)} | "
            f"{strategies or '-'} | {_ms(_med(ok, 'downtime_s'))} | {_f(switch)} | "
            f"{_mib(_med(rs, 'writer_rate'))} | {_f(_med(rs, 'mirror_s'), '.1f')} | "
            + (f"{kept / MiB:.1f} ({kept / d:.2f})" if kept is not None else "-")
            + f" | {_ms(_med(rs, 'mirror_write_p99_s'))} | {_ms(_med(rs, 'dest_write_p99_s'))} | "
            f"{_mib(_med(ok, 'recopied_bytes'))} |")
    return lines


def verdicts(rows: Sequence[Row], d: float, target: float) -> list[str]:
    """MET / MISSED per issue-10 target, with the figures behind each."""
    g = groups(rows)
    out = []
    out += _past_d(g, d, target)
    out += _latency(g, d)
    out += _low_rates(g, d, target)
    out += _deferral(g, d, target)
    return out


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("MET" if ok else "MISSED")


def _past_d(g: dict[tuple[str, float], list[Row]], d: float, target: float) -> list[str]:
    conv, keep, vs_wb = [], [], []
    for (name, rate), rs in g.items():
        if name not in BLOCKMIRROR_ACTIVE or rate < 1.45 * d:
            continue
        bad = [r for r in rs if not (r["converged"] and r["downtime_s"] <= target)]
        conv.append((not bad, f"{name} {rate / MiB:g}: {len(rs) - len(bad)}/{len(rs)}"))
        kept = statistics.median([kept_rate(r) or 0.0 for r in rs])
        keep.append((kept >= 0.5 * d, f"{name} {rate / MiB:g}: {kept / MiB:.1f}"))
        wb = _med(g.get(("qemu-wb", rate), []), "mirror_writer_rate")
        if wb is not None:
            ratio = kept / wb if wb > 0 else float("inf")
            vs_wb.append((ratio >= 5, f"{name} {rate / MiB:g}: {ratio:.2f}x"))
    return [
        _line("at ≥ 1.5 x D: mirror and auto converge in every run, downtime ≤ target", conv),
        _line("at ≥ 1.5 x D: writers keep ≥ 50 % of D while mirroring (MiB/s, median)", keep),
        _line("at ≥ 1.5 x D: writers keep ≥ 5x what qemu-wb leaves its guest", vs_wb),
    ]


def saturated_p99(rows: Sequence[Row]) -> float | None:
    """The destination's own p99 when written as fast as it goes (fio at
    rate 0), as it is while a copy runs: from the matrix's rate-0 rows."""
    return _med([r for r in rows if r["rate_requested"] == 0], "dest_write_p99_s")


def _latency(g: dict[tuple[str, float], list[Row]], d: float) -> list[str]:
    same, busy = [], []
    full = saturated_p99([r for rs in g.values() for r in rs])
    for (name, rate), rs in g.items():
        if name not in BLOCKMIRROR_ACTIVE:
            continue
        p99, dest = _med(rs, "mirror_write_p99_s"), _med(rs, "dest_write_p99_s")
        if p99 is None:
            continue
        if dest is not None:
            same.append((p99 <= 2 * dest, f"{name} {rate / MiB:g}: {p99 * 1000:.1f} vs "
                         f"{dest * 1000:.1f} ms"))
        if full is not None:
            busy.append((p99 <= 2 * full, f"{name} {rate / MiB:g}: {p99 * 1000:.1f} vs "
                         f"{full * 1000:.1f} ms"))
    return [_line("mirrored write p99 ≤ 2x the destination's own p99 at the same asked rate",
                  same),
            _line("mirrored write p99 ≤ 2x the destination's own p99 written flat out (as "
                  "while a copy runs)", busy)]


def _low_rates(g: dict[tuple[str, float], list[Row]], d: float, target: float) -> list[str]:
    low, mid = [], []
    for (name, rate), rs in g.items():
        if not name.startswith("blockmirror"):
            continue
        ok = [r for r in rs if r["converged"]]
        down = _med(ok, "downtime_s")
        if 0.7 * d <= rate <= 0.9 * d:  # every run, not the median
            worst = max((r["downtime_s"] for r in ok), default=None)
            mid.append((len(ok) == len(rs) and worst is not None and worst <= target,
                        f"{name} {rate / MiB:g}: {len(ok)}/{len(rs)} converged, worst "
                        f"{_ms(worst)} ms"))
        q = g.get(("qemu-mirror", rate))
        if rate > 0.5 * d or not q:
            continue
        q_down = _med([r for r in q if r["converged"]], "downtime_s")
        q_ready = _med(q, "ready_s")
        switch = _med(ok, "switchover_s")
        if down is None or q_down is None or q_ready is None or switch is None:
            low.append((False, f"{name} {rate / MiB:g}: a side did not converge"))
            continue
        bound = max(2 * q_down, LOW_DOWNTIME_FLOOR_S)
        low.append((down <= bound and switch <= q_ready,
                    f"{name} {rate / MiB:g}: downtime {down * 1000:.1f} ms (bound "
                    f"{bound * 1000:.1f}), switch {switch:.2f} s vs ready {q_ready:.2f} s"))
    return [
        _line("at ≤ 0.5 x D: downtime ≤ max(2x QEMU's, 20 ms), switch no later than QEMU's "
              "ready", low),
        _line("at 0.8 x D: every run converges, downtime ≤ target", mid),
    ]


def _deferral(g: dict[tuple[str, float], list[Row]], d: float, target: float) -> list[str]:
    checks = []
    for (name, rate), rs in g.items():
        if not name.endswith("+defer"):
            continue
        base = g.get((name[: -len("+defer")], rate))
        ok = [r for r in rs if r["converged"]]
        if not base or not ok:
            continue
        with_d = _med(ok, "recopied_bytes")
        without = _med([r for r in base if r["converged"]], "recopied_bytes")
        down = _med(ok, "downtime_s")
        if with_d is None or without is None or down is None:
            continue
        saving = 1 - with_d / without if without > 0 else 0.0
        checks.append((saving >= 0.30 and down <= target,
                       f"{name} {rate / MiB:g}: re-copied {with_d / MiB:.0f} vs "
                       f"{without / MiB:.0f} MiB ({saving:+.0%} saved), downtime "
                       f"{down * 1000:.0f} ms"))
    return [_line("hot-block deferral re-copies ≥ 30 % fewer bytes, downtime ≤ target",
                  checks)]


def _line(what: str, checks: list[tuple[bool, str]]) -> str:
    met = all(ok for ok, _ in checks) if checks else None
    return f"- {what}: {_verdict(met)}" + (
        " (" + "; ".join(f"{text}{'' if ok else ' ✗'}" for ok, text in sorted(
            checks, key=lambda c: c[1])) + ")" if checks else " (no such rows)")


def markdown(rows: Sequence[Row], d: float, target: float, measured_c: float) -> list[str]:
    return [
        "## Issue 10: mirrored writers, latency, strategy", "",
        f"D = {d / MiB:.1f} MiB/s (measured copy throughput C = {measured_c / MiB:.1f} MiB/s). "
        "Rate 0 rows: destination alone = fio flat out. "
        "writers while mirroring: blockmirror from mirroring engaged to the switchover "
        "decision; QEMU from blockdev-mirror to ready (fio's periodic reports). writer p99: "
        "blockmirror's writers' single writes in that window; fio's completion latency p99 "
        "over its whole run for QEMU (iodepth 8). destination alone: fio psync random writes "
        "of the same size at the same asked rate on a fresh slow disk.", "",
        *table(rows, d), "", "### Targets", "", *verdicts(rows, d, target),
    ]


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.1f}"


def _mib(v: float | None) -> str:
    return "-" if v is None else f"{v / MiB:.1f}"


def _f(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)
