"""Smoke tests of the convergence harness's issue-10 parts: strategy lists,
the copy cap on a slow destination, fio's periodic reports, the verdicts, and
(root, qemu-storage-daemon, fio) one tiny point of every engine on a slow
destination. No timing verdict: the figures come from
``blockmirror bench convergence --dest-bandwidth ...`` (bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.convergence import harness, issue10, qemu_peer, slowdisk  # noqa: E402

MiB = 1 << 20


def test_strategy_lists_and_deferral_suffix() -> None:
    assert harness.split_strategy("mirror") == ("mirror", False)
    assert harness.split_strategy("fail+defer") == ("fail", True)
    assert harness.split_strategy("fail+hot")[0] == ""
    cfg = harness.MatrixConfig(converge="mirror,auto,fail+defer")
    assert cfg.strategies == ["mirror", "auto", "fail+defer"]
    with pytest.raises(ValueError):
        harness.MatrixConfig(converge="mirror,bogus")
    with pytest.raises(argparse.ArgumentTypeError):
        harness._strategies("auto+hot")


def test_copy_cap_defaults_to_none_on_a_slow_destination() -> None:
    parse = harness.build_parser().parse_args
    assert harness.config_from_args(parse([])).copy_cap == 64 * MiB
    slow = harness.config_from_args(parse(["--dest-bandwidth", "32"]))
    assert slow.copy_cap is None and slow.dest_bandwidth == 32 * MiB
    capped = harness.config_from_args(parse(["--dest-bandwidth", "32", "--copy-cap", "16"]))
    assert capped.copy_cap == 16 * MiB


def test_fio_periodic_reports(tmp_path: Path) -> None:
    def report(ms: int, written: int, p99: int) -> str:
        return json.dumps({"timestamp_ms": ms, "jobs": [{"write": {
            "io_bytes": written, "bw_bytes": written,
            "clat_ns": {"percentile": {"99.000000": p99}}}}]})

    out = tmp_path / "fio.json"
    out.write_text("note: a message line\n" + report(10_000, 0, 1) + "\n"
                   + report(11_000, 4 * MiB, 2) + "\n" + report(12_000, 6 * MiB, 3_000_000))
    assert len(qemu_peer.fio_reports(out)) == 3
    assert qemu_peer.fio_written_between(out, 10.0, 11.0) == pytest.approx(4 * MiB)
    assert qemu_peer.fio_written_between(out, 10.5, 12.0) == pytest.approx(4 * MiB / 1.5)
    assert qemu_peer.fio_write_stats(out) == (6 * MiB, pytest.approx(0.003))


def _row(label: str, rate: float, **kw: Any) -> dict[str, Any]:
    row = {"engine": label.split()[0], "label": label, "rate_requested": rate * MiB,
           "outcome": "converged", "converged": True, "downtime_s": 0.01,
           "switchover_s": 1.0, "ready_s": 2.0, "recopied_bytes": 10 * MiB}
    row.update(kw)
    return row


def test_verdicts_follow_the_figures() -> None:
    d = 32 * MiB
    rows = [_row("blockmirror mirror", 48, mirror_writer_rate=20 * MiB,
                 mirror_write_p99_s=0.05, dest_write_p99_s=0.03),
            _row("qemu-wb", 48, mirror_writer_rate=3 * MiB)]
    lines = issue10.verdicts(rows, d, 0.5)
    assert "MET" in lines[1] and "MET" in lines[2] and "MET" in lines[3]
    rows[0]["mirror_writer_rate"] = 10 * MiB  # under half of D, and only 3.3x QEMU's
    rows[0]["mirror_write_p99_s"] = 0.07  # over 2x the destination's
    lines = issue10.verdicts(rows, d, 0.5)
    assert "MISSED" in lines[1] and "MISSED" in lines[2] and "MISSED" in lines[3]
    rows[0].update(converged=False, outcome="not_converged")
    assert "MISSED" in issue10.verdicts(rows, d, 0.5)[0]


def test_deferral_verdict_counts_recopied_bytes() -> None:
    rows = [_row("blockmirror fail", 26, recopied_bytes=100 * MiB),
            _row("blockmirror fail+defer", 26, recopied_bytes=75 * MiB)]
    assert "MISSED" in issue10.verdicts(rows, 32 * MiB, 0.5)[-1]
    rows[1]["recopied_bytes"] = 60 * MiB
    assert "MET" in issue10.verdicts(rows, 32 * MiB, 0.5)[-1]


def _why_no_point() -> str | None:
    return slowdisk.skip_reason() or qemu_peer.missing_tools() or (
        None if shutil.which("fio") else "fio not installed")


@pytest.mark.skipif(_why_no_point() is not None, reason=str(_why_no_point()))
def test_one_point_per_engine_on_a_slow_destination(tmp_path: Path) -> None:
    cfg = harness.MatrixConfig(image_size=48 * MiB, rates=[40 * MiB], converge="mirror",
                               copy_cap=None, dest_bandwidth=32 * MiB, qemu=True, qemu_wb=True,
                               qemu_timeout_s=10, warmup_s=0.2, output=tmp_path / "out",
                               workdir=tmp_path / "work", plots=False)
    result = harness.run_matrix(cfg, log=lambda line: None)
    by = {issue10.label(r): r for r in result.rows}
    assert set(by) == {"blockmirror mirror", "qemu-mirror", "qemu-wb"}
    bm, wb = by["blockmirror mirror"], by["qemu-wb"]
    assert bm["outcome"] == "converged", bm.get("notes")
    assert bm["strategy"] == "mirror" and bm["mirror_s"] > 0
    assert bm["mirror_writer_rate"] > 0 and bm["mirror_write_p99_s"] > 0
    assert bm["dest_write_p99_s"] > 0
    assert wb["outcome"] == "converged", wb.get("notes")
    assert wb["identical"] and wb["mirror_writer_rate"] > 0
    assert "Issue 10" in (tmp_path / "out" / "summary.md").read_text()
    assert not list((tmp_path / "work").glob("*/bm-slowdisk-*")), "a slow disk was left"
