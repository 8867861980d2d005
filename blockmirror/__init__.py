"""blockmirror: live block-level replication of disk images with change-block tracking."""

import importlib
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from blockmirror.migration import SyncOptions, SyncProgress, SyncResult, sync
    from blockmirror.tracking.image import TrackedImage
    from blockmirror.tracking.tracker import Tracker, sidecar_path

# Loaded on first use (PEP 562): the C core and numpy cost ~100 ms, which
# `blockmirror --help` and the light commands should not pay.
_LAZY = {
    "SyncOptions": "blockmirror.migration", "SyncProgress": "blockmirror.migration",
    "SyncResult": "blockmirror.migration", "sync": "blockmirror.migration",
    "TrackedImage": "blockmirror.tracking.image", "Tracker": "blockmirror.tracking.tracker",
    "sidecar_path": "blockmirror.tracking.tracker",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'blockmirror' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


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
