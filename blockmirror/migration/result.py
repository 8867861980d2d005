"""What a sync reports: progress as it goes, and the result at the end."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from blockmirror.migration.policy import PassRecord
from blockmirror.units import format_bytes, format_seconds


@dataclass
class SyncProgress:
    """What a progress display needs, sent as the copy advances."""

    phase: str  # "bulk", "dirty", "final", "verify", "done"
    pass_index: int
    bytes_done: int
    bytes_total: int
    rate: float  # bytes/s in this pass so far
    dirty_bytes: int  # dirty bytes waiting (at the start of this pass)
    elapsed: float

    @property
    def eta(self) -> float:
        """Seconds until this pass ends at the current rate."""
        left = self.bytes_total - self.bytes_done
        return left / self.rate if self.rate > 0 else float("inf")


ProgressCallback = Callable[[SyncProgress], None]


@dataclass
class SyncResult:
    """What a finished sync did."""

    status: str
    source: str
    destination: str
    mode: str
    tracked: bool
    image_size: int
    allocated_bytes: int
    target_downtime: float
    passes: list[PassRecord] = field(default_factory=list)
    bytes_copied: int = 0  # source bytes processed, holes included (see bytes_written)
    bytes_written: int = 0
    downtime: float = 0.0
    elapsed: float = 0.0
    verified: bool = False
    notes: list[str] = field(default_factory=list)
    incremental: bool = False  # an earlier copy was updated in place
    bytes_skipped: int = 0  # incremental: the image's bytes the first pass did not copy
    change_id: str | None = None  # the source's change id the copy is exact at
    children: list[SyncResult] = field(default_factory=list)  # directory mode: one per image
    # What finished the job: "passes" (dirty passes alone), "mirror" or
    # "throttle", and, when converge="auto" escalated, why.
    strategy: str = "passes"
    strategy_reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "source": self.source,
            "destination": self.destination,
            "mode": self.mode,
            "tracked": self.tracked,
            "image_size": self.image_size,
            "allocated_bytes": self.allocated_bytes,
            "target_downtime": self.target_downtime,
            "passes": [p.to_dict() for p in self.passes],
            "bytes_copied": self.bytes_copied,
            "bytes_written": self.bytes_written,
            "downtime": round(self.downtime, 6),
            "elapsed": round(self.elapsed, 6),
            "verified": self.verified,
            "incremental": self.incremental,
            "bytes_skipped": self.bytes_skipped,
            "change_id": self.change_id,
            "notes": self.notes,
            "strategy": self.strategy,
            "strategy_reason": self.strategy_reason,
            "children": [c.to_dict() for c in self.children],
        }

    def summary(self) -> str:
        verb = "moved" if self.mode == "move" else "copied"
        line = (
            f"{verb} {self.source} -> {self.destination}: "
            f"{format_bytes(self.bytes_copied)} in {len(self.passes)} "
            f"{'pass' if len(self.passes) == 1 else 'passes'}, "
            f"{format_seconds(self.elapsed)}"
        )
        if self.tracked:
            line += f", writers paused {format_seconds(self.downtime)}"
        if self.tracked and self.strategy != "passes":
            line += f", converged by {self.strategy}"
        if self.verified:
            line += ", verified"
        return line


