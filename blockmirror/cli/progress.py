"""The progress line ``sync`` shows on a terminal."""

from __future__ import annotations

import time
from typing import TextIO

from blockmirror.migration.result import SyncProgress
from blockmirror.units import format_bytes, format_rate, format_seconds


class ProgressLine:
    """One self-rewriting status line on a terminal; silent when not a tty."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.enabled = stream.isatty()
        self.last = 0.0

    def __call__(self, p: SyncProgress) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if p.phase not in ("done", "final") and now - self.last < 0.2:
            return
        self.last = now
        if p.phase == "done":
            self.stream.write("\r\033[K")
            self.stream.flush()
            return
        pct = 100.0 * p.bytes_done / p.bytes_total if p.bytes_total else 100.0
        line = (
            f"pass {p.pass_index} {p.phase:<6} {format_bytes(p.bytes_done)}/"
            f"{format_bytes(p.bytes_total)} ({pct:4.1f}%) {format_rate(p.rate)}"
            f"  dirty {format_bytes(p.dirty_bytes)}  ETA {format_seconds(p.eta)}"
            f"  elapsed {format_seconds(p.elapsed)}"
        )
        self.stream.write("\r\033[K" + line)
        self.stream.flush()
