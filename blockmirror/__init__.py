"""blockmirror: live block-level replication of disk images with change-block tracking."""

from blockmirror._version import __version__
from blockmirror.errors import (
    BlockMirrorError,
    ChangeIdInvalidError,
    FreezeError,
    NotConvergedError,
    OutOfSpaceError,
    SidecarCorruptError,
    SidecarError,
    SidecarUnsafeError,
)
from blockmirror.image import TrackedImage
from blockmirror.tracker import Tracker, sidecar_path

__all__ = [
    "BlockMirrorError",
    "ChangeIdInvalidError",
    "FreezeError",
    "NotConvergedError",
    "OutOfSpaceError",
    "SidecarCorruptError",
    "SidecarError",
    "SidecarUnsafeError",
    "TrackedImage",
    "Tracker",
    "__version__",
    "sidecar_path",
]
