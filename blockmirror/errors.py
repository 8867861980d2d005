"""The exceptions blockmirror raises.

Every failure a caller must handle differently has its own class. Those that
come from the operating system are also ``OSError`` subclasses carrying
``errno`` and the path, so ``except OSError`` keeps working.
"""

from __future__ import annotations

import errno as _errno


class BlockMirrorError(Exception):
    """Base of every error blockmirror raises on its own account."""


class SidecarError(BlockMirrorError, OSError):
    """The change-tracking sidecar cannot be used."""


class SidecarCorruptError(SidecarError):
    """The sidecar is truncated, foreign or corrupt; its bitmap is not trusted."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(_errno.EUCLEAN, message, path)


class SidecarUnsafeError(SidecarError):
    """The sidecar's owner or mode would let another user steer writers (I5)."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(_errno.EPERM, message, path)


class NotConvergedError(BlockMirrorError):
    """Writes outpace the copy; the source was left running and untouched."""


class OutOfSpaceError(BlockMirrorError, OSError):
    """The destination has no room; what the copy created was removed."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(_errno.ENOSPC, message, path)


class FreezeError(BlockMirrorError, OSError):
    """Writers could not be frozen, or the freeze lease ran out before switchover."""


class VerifyError(BlockMirrorError, OSError):
    """``sync --verify`` found the copy differs from the source where no
    write since the switch explains it; the copy was removed (copy mode)."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(_errno.EIO, message, path)


class ChangeIdInvalidError(BlockMirrorError):
    """A change id cannot be answered truthfully; the caller must take a full copy."""


class InvalidInputError(BlockMirrorError, ValueError):
    """The request cannot be carried out as asked (missing source, bad path,
    destination exists, ...). Nothing was created."""


class SourceChangedError(NotConvergedError):
    """An untracked source changed while it was copied; the copy was discarded."""
