"""The settings of one sync, checked once and shared by file and directory mode."""

from __future__ import annotations

from dataclasses import dataclass

from blockmirror.errors import InvalidInputError
from blockmirror.migration.policy import ConvergencePolicy
from blockmirror.migration.result import ProgressCallback

MODES = ("copy", "move")
CONVERGE_STRATEGIES = ("fail", "throttle", "mirror", "auto")
MAX_REQUESTS = 256  # of 256 KiB each, per connection: 64 MiB of buffers


@dataclass(frozen=True)
class SyncOptions:
    """How to sync: every keyword of :func:`blockmirror.sync` but the paths.

    ``rate_limit`` caps the copier's own data rate (``--bwlimit``); the
    writers' throttle is what ``converge="throttle"`` sets.
    """

    target_downtime: float = 5.0
    mode: str = "copy"  # "copy" or "move"
    max_passes: int = 30
    verify: bool = False
    progress: ProgressCallback | None = None
    force: bool = False
    workers: int = 4
    rate_limit: float | None = None  # bytes/s the copier may move (None: no cap)
    converge: str = "fail"  # what to do when writes outpace the copy
    # Hot blocks wait for the final pass (policy.defer_budget), and the switch
    # comes as soon as the target fits, without polishing passes. Off by
    # default: it lengthens the pause at low rates (README).
    defer_hot: bool = False
    # NBD commands in flight per connection to an nbd:// endpoint (None: 32);
    # a long link needs more (bench/README.md, "requests in flight").
    requests: int | None = None
    # The caller's word that nothing writes an nbd:// *source* during the copy
    # (its writers are not tracked): needed for a writable export.
    quiesced: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidInputError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.converge not in CONVERGE_STRATEGIES:
            raise InvalidInputError(
                f"converge must be one of {CONVERGE_STRATEGIES}, got {self.converge!r}"
            )
        if self.workers < 1:
            raise InvalidInputError(f"workers must be >= 1, got {self.workers}")
        if self.requests is not None and not 1 <= self.requests <= MAX_REQUESTS:
            raise InvalidInputError(f"requests must be 1 to {MAX_REQUESTS}, got {self.requests}")
        if self.rate_limit is not None and not 0 <= self.rate_limit < 2**63:
            raise InvalidInputError(f"rate limit must be >= 0 and < 2**63, got {self.rate_limit}")
        self.policy()  # the policy checks the downtime and pass limits

    def policy(self) -> ConvergencePolicy:
        """The switchover and stall rules these options ask for."""
        try:
            # Deferral trades the shortest pause for fewer bytes: polishing
            # passes would copy the hot blocks it holds back, again and again.
            polish = 0 if self.defer_hot else ConvergencePolicy.polish_passes
            return ConvergencePolicy(target_downtime=self.target_downtime,
                                     max_passes=self.max_passes, polish_passes=polish)
        except ValueError as e:
            raise InvalidInputError(str(e)) from None

    @property
    def move(self) -> bool:
        return self.mode == "move"
