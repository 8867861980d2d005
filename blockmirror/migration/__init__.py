"""The migration: pre-check, passes, switchover and commit of one sync.

``run`` is the entry (file or directory mode); ``job`` is one file's sync as
a job with explicit states; ``policy`` decides when to switch over;
``precheck``, ``commit``, ``incremental`` and ``manifest`` are its steps.

The names below load on first use (PEP 562), so a command that needs only
one step (``track status`` uses the pre-check's file checks) does not load
the whole sync.
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from blockmirror.migration.options import SyncOptions
    from blockmirror.migration.result import SyncProgress, SyncResult
    from blockmirror.migration.run import sync

__all__ = ["SyncOptions", "SyncProgress", "SyncResult", "sync"]

_LAZY = {"SyncOptions": "blockmirror.migration.options",
         "SyncProgress": "blockmirror.migration.result",
         "SyncResult": "blockmirror.migration.result", "sync": "blockmirror.migration.run"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'blockmirror.migration' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
