"""blockmirror: live block-level replication of disk images with change-block tracking."""

from blockmirror._version import __version__
from blockmirror.errors import (
    BlockMirrorError,
    ChangeIdInvalidError,
    FreezeError,
    InvalidInputError,
    NotConvergedError,
    OutOfSpaceError,
    SidecarCorruptError,
    SidecarError,
    SidecarUnsafeError,
    SourceChangedError,
    VerifyError,
)
from blockmirror.migration import SyncOptions, SyncProgress, SyncResult, sync
from blockmirror.tracking.image import TrackedImage
from blockmirror.tracking.tracker import Tracker, sidecar_path

__all__ = [
    "BlockMirrorError",
    "ChangeIdInvalidError",
    "FreezeError",
    "InvalidInputError",
    "NotConvergedError",
    "OutOfSpaceError",
    "SidecarCorruptError",
    "SidecarError",
    "SidecarUnsafeError",
    "SourceChangedError",
    "SyncOptions",
    "SyncProgress",
    "SyncResult",
    "TrackedImage",
    "Tracker",
    "VerifyError",
    "__version__",
    "sidecar_path",
    "sync",
]
