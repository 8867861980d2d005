"""Pool several ``blockmirror bench nbd`` runs: the paired per-round ratios of
every run of the same image history (``fill_block``) together, for a verdict
that one busy spell of a shared machine cannot flip.

    python -m bench.nbd.pool DIR [DIR ...]      # folders holding results.json
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .harness import TARGET_RATIO
from .servers import BASELINE

KiB = 1 << 10


def paired(runs: Sequence[dict[str, Any]], job: str, server: str) -> tuple[list[float],
                                                                         list[float]]:
    """Per-round IOPS ratios and server-CPU-per-IO ratios of SERVER to the baseline."""
    iops: list[float] = []
    cpu: list[float] = []
    for run in runs:
        samples = run["samples"]
        base = {s["round"]: s for s in samples if s["job"] == job and s["server"] == BASELINE}
        for s in samples:
            b = base.get(s["round"])
            if s["job"] != job or s["server"] != server or b is None or b["iops"] <= 0:
                continue
            iops.append(s["iops"] / b["iops"])
            if s.get("ios") and b.get("ios") and s["server_cpu_s"] > 0 and b["server_cpu_s"] > 0:
                cpu.append((s["server_cpu_s"] / s["ios"]) / (b["server_cpu_s"] / b["ios"]))
    return iops, cpu


def table(folders: Sequence[Path]) -> str:
    by_fill: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for folder in folders:
        run = json.loads((Path(folder) / "results.json").read_text())
        by_fill[int(run["config"].get("fill_block", 4 << 20))].append(run)
    lines = ["| images written | job | rounds | blockmirror ÷ nbdkit file, median (IQR) | "
             f"≥ {TARGET_RATIO:g} | server CPU/IO ÷ nbdkit file (rounds) | "
             "qemu-nbd ÷ nbdkit file |", "|---|---|---|---|---|---|---|"]
    for fill, runs in sorted(by_fill.items()):
        jobs = dict.fromkeys(s["job"] for run in runs for s in run["samples"])
        for job in jobs:
            ratios, cpu = paired(runs, job, "blockmirror")
            qemu, _ = paired(runs, job, "qemu-nbd")
            if not ratios:
                continue
            quart = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
            med = statistics.median(ratios)
            cpu_text = f"{statistics.median(cpu):.2f} ({len(cpu)})" if cpu else "-"
            qemu_text = f"{statistics.median(qemu):.2f}" if qemu else "-"
            verdict = "MET" if med >= TARGET_RATIO else "MISSED"
            lines.append(f"| {fill // KiB:g} KiB at a time | {job} | {len(ratios)} | "
                         f"**{med:.2f}** ({quart[0]:.2f}-{quart[2]:.2f}) | {verdict} | "
                         f"{cpu_text} | {qemu_text} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    print(table([Path(a) for a in args]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
