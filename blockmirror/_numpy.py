"""numpy, loaded on first use, or early on a thread of its own (issue 11).

numpy's import costs ~45 ms of CPU, a third of a whole 256 MiB durable
``sync`` command. A new untracked local copy never needs it: its manifest is
built from the digests its bulk pass took, in plain arrays
(``DigestTable.learn``). Other syncs need it only once their bulk copy is
done (a tracker's dirty arrays, an earlier copy's manifest), and the copy
runs in C with the GIL released on a core numpy's import can share. So the
modules of that path name ``np`` as the stand-in below, which imports numpy
at the first attribute looked up, and the bulk pass of such a sync calls
:func:`preload` as it starts copying: numpy then loads beside the copy
instead of before it.

The preload thread is not a daemon: a process that ends while it runs waits
for it (an import is never abandoned half done). Importing numpy in the main
thread meanwhile just waits for the preload's import to finish (the import
system's per-module lock).
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import threading
from types import ModuleType
from typing import Any

PRELOAD_SWITCH_INTERVAL_S = 0.0002
_lock = threading.Lock()
_preload: threading.Thread | None = None


def loaded() -> bool:
    """Whether numpy is imported (or being imported) in this process."""
    return "numpy" in sys.modules


def preload() -> None:
    """Start importing numpy on another thread, once, unless it is loaded."""
    global _preload
    with _lock:
        if _preload is not None or loaded():
            return
        _preload = threading.Thread(target=_import_quietly, name="blockmirror-numpy-preload")
        _preload.start()


def _import_quietly() -> None:
    # A failure is raised again where numpy is really needed (the import
    # system forgets a module whose import failed).
    # While it imports (~45 ms holding the GIL), a copy worker coming back
    # from C, or the thread feeding them, would wait up to the interpreter's
    # switch interval (5 ms) for the GIL each time: hand it over sooner.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(min(interval, PRELOAD_SWITCH_INTERVAL_S))
    try:
        with contextlib.suppress(BaseException):
            importlib.import_module("numpy")
    finally:
        sys.setswitchinterval(interval)


_numpy: ModuleType | None = None


def module() -> ModuleType:
    """numpy itself, fully imported: imported now if no preload did, or
    waited for if the preload is still at it."""
    global _numpy
    if _numpy is None:
        _numpy = importlib.import_module("numpy")
        thread = _preload
        if thread is not None and thread is not threading.current_thread():
            thread.join()  # it has imported numpy: it is ending
    return _numpy


class _OnFirstUse:
    """Stands in for the numpy module: every attribute comes from the real one."""

    def __getattr__(self, name: str) -> Any:
        return getattr(module(), name)


np: Any = _OnFirstUse()
