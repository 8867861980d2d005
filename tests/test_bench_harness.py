"""The convergence harness (bench/convergence, issue 4) checks its own output.

A small, fast matrix (16 MiB image, copy capped at 32 MiB/s, one writer
process) runs through the harness API: idle, a low rate that must converge,
and a rate well past the copy cap that must not. Every row must be internally
consistent, and the files must be there and agree with the rows.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.convergence import harness, model, qemu_peer  # noqa: E402

MiB = 1 << 20
IMAGE = 16 * MiB
CAP = 32 * MiB
LOW = 2 * MiB
HIGH = 96 * MiB  # three times the cap


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> harness.MatrixResult:
    out = tmp_path_factory.mktemp("convergence")
    cfg = harness.MatrixConfig(
        image_size=IMAGE, allocated_fraction=0.5, rates=[0, LOW, HIGH], writers=1,
        target_downtime=0.1, copy_cap=CAP, max_passes=6, warmup_s=0.2, output=out,
        workdir=out / "work", plots=False,
    )
    return harness.run_matrix(cfg, log=lambda line: None)


def _row(result: harness.MatrixResult, rate: float) -> dict[str, Any]:
    rows = [r for r in result.rows if r["rate_requested"] == rate]
    assert len(rows) == 1, rows
    return rows[0]


def test_files_exist_and_agree_with_rows(matrix: harness.MatrixResult) -> None:
    out = matrix.config.output
    for name in ("runs.csv", "runs.json", "summary.csv", "summary.md", "model.json"):
        assert (out / name).is_file(), name
        assert (out / name).stat().st_size > 0, name
    with open(out / "runs.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert [float(r["rate_requested_mib"]) for r in csv_rows] == [0.0, LOW / MiB, HIGH / MiB]
    assert [r["outcome"] for r in csv_rows] == [r["outcome"] for r in matrix.rows]
    runs = json.loads((out / "runs.json").read_text())
    assert len(runs["runs"]) == 3
    assert [r["bytes_copied"] for r in runs["runs"]] == [r["bytes_copied"] for r in matrix.rows]
    assert not (out / "work").exists() or not any((out / "work").iterdir()), \
        "scratch images were left behind"


def test_no_point_errored(matrix: harness.MatrixResult) -> None:
    errors = [r["notes"] for r in matrix.rows if r["outcome"] == "error"]
    assert not errors, errors


def test_low_rate_converges_and_verifies(matrix: harness.MatrixResult) -> None:
    for rate in (0, LOW):
        row = _row(matrix, rate)
        assert row["outcome"] == "converged", row["notes"]
        assert row["verified"] is True
        assert row["switchover_s"] == row["decision_s"]
    low = _row(matrix, LOW)
    assert low["writer_rate"] == pytest.approx(LOW, rel=0.25)
    assert low["writer_max_write_s"] > 0  # the freeze held at least one write back


def test_rate_far_past_the_cap_does_not_converge(matrix: harness.MatrixResult) -> None:
    row = _row(matrix, HIGH)
    # The premise: the writers really did outpace the copy.
    assert row["writer_rate"] > 1.5 * row["bulk_throughput"], row
    assert row["outcome"] == "not_converged"
    assert row["decision"] in ("stalled", "out_of_passes")
    assert row["passes"] <= matrix.config.max_passes
    assert row["source_untouched"] is True, row
    assert row["dst_left"] == ""
    assert row["tracker_state"] == "running"
    assert row["writes_after_failure_bytes"] > 0
    assert row["downtime_s"] == 0.0


def test_rows_are_internally_consistent(matrix: harness.MatrixResult) -> None:
    for row in matrix.rows:
        assert row["passes"] >= 1
        assert row["passes"] == len(row["pass_list"])
        assert row["pass_list"][0]["kind"] == "bulk"
        assert 0 <= row["downtime_s"] <= row["elapsed_s"]
        assert 0 < row["decision_s"] <= row["elapsed_s"]
        assert row["bytes_copied"] == sum(p["bytes"] for p in row["pass_list"])
        assert row["amplification"] == pytest.approx(row["bytes_copied"] / IMAGE)
        assert row["bulk_throughput"] <= 1.2 * CAP, "the copy cap did not hold"
        if row["converged"]:
            assert row["pass_list"][-1]["kind"] == "final"
            assert row["bytes_copied"] >= row["allocated_bytes"] > 0
            # the bitmap only gains bits between the decision and the freeze
            assert row["final_extra_bytes"] >= 0
            assert row["predicted_downtime_s"] < matrix.config.target_downtime
        else:
            assert all(p["kind"] != "final" for p in row["pass_list"])
        assert row["model_passes"] >= 2
        assert row["passes_minus_model"] == row["passes"] - row["model_passes"]


def test_targets_are_evaluated(matrix: harness.MatrixResult) -> None:
    t = matrix.targets
    assert t["copy_throughput"] == pytest.approx(_row(matrix, 0)["bulk_throughput"])
    assert t["converge_below_0.8C"]["runs"] == 2  # idle and the low rate
    assert t["non_convergence_within_3"]["runs_past_C"] == 1
    assert t["vs_qemu"]["met"] is None  # not asked for
    text = (matrix.config.output / "summary.md").read_text()
    assert "## Targets" in text and "| blockmirror | 96 |" in text


# -- the model --------------------------------------------------------------------


def _uniform(rate: float) -> model.Workload:
    return model.Workload(image_size=256 * MiB, write_rate=rate)


def test_model_without_writers_is_one_bulk_pass() -> None:
    p = model.predict(_uniform(0), allocated=64 * MiB, copy_throughput=64 * MiB,
                      target_downtime=0.5)
    assert p.converged and p.passes == 2
    assert p.bytes_copied == 64 * MiB
    assert p.switchover_s == pytest.approx(1.0)
    assert p.downtime_s == 0.0


def test_model_converges_below_and_not_far_above_the_copy_rate() -> None:
    below = model.predict(_uniform(32 * MiB), allocated=128 * MiB, copy_throughput=64 * MiB,
                          target_downtime=0.25)
    assert below.converged and below.downtime_s < 0.25
    assert below.passes > 2  # needs dirty passes
    above = model.predict(_uniform(256 * MiB), allocated=128 * MiB, copy_throughput=64 * MiB,
                          target_downtime=0.25)
    assert not above.converged and above.reason == "stalled"
    assert above.passes == 4  # bulk + 3 growing dirty passes


def test_mirrored_model_converges_past_the_copy_rate_in_one_paced_pass() -> None:
    """Where passes alone stall, mirroring leaves nothing dirty after the
    pass that copies what the bulk pass left, paced to the 0.4 C floor."""
    wl = _uniform(256 * MiB)
    passes_only = model.predict(wl, allocated=128 * MiB, copy_throughput=64 * MiB,
                                target_downtime=0.25)
    mirrored = model.predict(wl, allocated=128 * MiB, copy_throughput=64 * MiB,
                             target_downtime=0.25, mirror_writer_rate=32 * MiB)
    assert not passes_only.converged
    assert mirrored.converged and mirrored.passes == 3 and mirrored.downtime_s == 0.0
    bulk, paced = mirrored.pass_list[0], mirrored.pass_list[1]
    assert paced.bytes == bulk.dirty_left and paced.dirty_left == 0.0
    assert paced.seconds == pytest.approx(bulk.dirty_left / (0.5 * 64 * MiB))  # C - W_m
    slow = model.predict(wl, allocated=128 * MiB, copy_throughput=64 * MiB,
                         target_downtime=0.25, mirror_writer_rate=60 * MiB)
    assert slow.pass_list[1].seconds == pytest.approx(bulk.dirty_left / (0.4 * 64 * MiB))


def test_model_dirty_set_saturates_at_the_working_set() -> None:
    d = model.DirtyModel(_uniform(64 * MiB))
    writes = 1000
    assert d.dirty_after_writes(writes) == pytest.approx(
        256 * MiB * (1 - math.exp(-writes / 4096)), rel=1e-3)
    assert d.dirty_after(1e6) == pytest.approx(256 * MiB)
    hot = model.DirtyModel(model.Workload(image_size=256 * MiB, write_rate=64 * MiB,
                                          pattern="hotspot"))
    assert hot.dirty_after_writes(4096) < 0.5 * d.dirty_after_writes(4096)
    seq = model.DirtyModel(model.Workload(image_size=256 * MiB, write_rate=64 * MiB,
                                          pattern="sequential", writers=2))
    assert seq.dirty_after(1.0) == 32 * MiB  # two writers in step, 32 MiB/s each


# -- entry points -------------------------------------------------------------------


def test_cli_entry_hands_over_to_the_harness(capsys: pytest.CaptureFixture[str]) -> None:
    from blockmirror import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "convergence", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "blockmirror bench convergence" in text
    for option in ("--rates", "--copy-cap", "--writers", "--qemu", "--pattern"):
        assert option in text


def test_qemu_peer_reports_missing_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    message = qemu_peer.missing_tools()
    assert message is not None and "qemu-storage-daemon" in message and "fio" in message
