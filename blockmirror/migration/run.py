"""The entry point of a sync: file mode or directory mode."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from blockmirror.copying.uri_names import looks_like_uri
from blockmirror.migration import precheck
from blockmirror.migration.job import FileSyncJob
from blockmirror.migration.options import SyncOptions
from blockmirror.migration.result import SyncResult


def sync(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    options: SyncOptions | None = None,
    /,
    **settings: Any,
) -> SyncResult:
    """Copy (or move) the live image SRC to DST, exact at one instant.

    Settings are those of :class:`SyncOptions` (``target_downtime=5.0``,
    ``mode="copy"``, ``max_passes=30``, ``verify=False``, ``progress=None``,
    ``force=False``, ``workers=4``, ``rate_limit=None``, ``converge="fail"``,
    ``defer_hot=False``),
    given as keywords or as one SyncOptions.

    DST may be an existing folder (the image keeps its name); a folder SRC
    is synced in directory mode. Raises ``InvalidInputError`` for bad input,
    ``OutOfSpaceError``, ``NotConvergedError`` when writes outpace the copy,
    ``FreezeError`` when writers cannot be paused, or an ``OSError``. On
    every failure the source is untouched, writers run on, and the
    destination side is removed.

    ``converge="throttle"`` slows writers down (the shared throttle in the
    sidecar) instead of failing when the dirty set stops shrinking;
    ``converge="mirror"`` sends writers' writes to clean ranges to the copy as
    well, after the first pass; ``converge="auto"`` starts without either and
    escalates when the passes' trend says they will not converge.
    ``defer_hot`` leaves blocks dirtied pass after pass for the final pass.
    """
    try:
        opts = dataclasses.replace(options or SyncOptions(), **settings)
    except TypeError as e:  # an unknown keyword
        raise TypeError(f"sync() {e}") from None
    src_s, dst_s = os.fspath(src), os.fspath(dst)
    if looks_like_uri(dst_s) or looks_like_uri(src_s):
        return _sync_remote(src_s, dst_s, opts)
    if os.path.isdir(src_s):
        from blockmirror.migration.directory import sync_directory  # late: few syncs need it

        return sync_directory(src_s, dst_s, opts, sync_file=sync_file)
    return sync_file(src_s, dst_s, opts)


def sync_file(src: str, dst: str, options: SyncOptions) -> SyncResult:
    """File mode: one image."""
    plan = precheck.plan_file_sync(src, dst, force=options.force, move=options.move)
    return FileSyncJob(plan, options).run()


def _sync_remote(src: str, dst: str, opts: SyncOptions) -> SyncResult:
    """An NBD export or an NFS file on either side, each kind in its own
    module, loaded only by the syncs that use it: into an export
    (remote.py), into an NFS file (remote_nfs.py), or from either into a
    local file (remote_source.py)."""
    from blockmirror.copying.endpoint import NfsUrl, parse

    if looks_like_uri(src):
        from blockmirror.migration.remote_source import sync_from_export

        return sync_from_export(src, dst, opts)
    where = parse(dst)
    if isinstance(where, NfsUrl):
        from blockmirror.migration.remote_nfs import sync_to_nfs

        return sync_to_nfs(src, where, opts)
    from blockmirror.migration.remote import sync_to_export

    return sync_to_export(src, dst, opts)
