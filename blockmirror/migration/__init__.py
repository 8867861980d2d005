"""The migration: pre-check, passes, switchover and commit of one sync.

``run`` is the entry (file or directory mode); ``job`` is one file's sync as
a job with explicit states; ``policy`` decides when to switch over;
``precheck``, ``commit``, ``incremental`` and ``manifest`` are its steps.
"""

from blockmirror.migration.options import SyncOptions
from blockmirror.migration.result import SyncProgress, SyncResult
from blockmirror.migration.run import sync

__all__ = ["SyncOptions", "SyncProgress", "SyncResult", "sync"]
