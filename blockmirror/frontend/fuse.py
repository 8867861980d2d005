"""``serve --fuse DIR``: nbdfuse mounts DIR with the export as the one file
DIR/NAME, for programs that need a path (and, through losetup, a filesystem).

It is unmounted with a plain umount first, which fails while the file is in
use (an open descriptor, a loop device): stopping then waits for it to be
released instead of cutting its users off; a second stop request forces a
lazy detach. nbdfuse gets SIGTERM should the supervisor die (setpriv
--pdeathsig), and on SIGTERM it detaches the mount itself, so no mount
outlives the supervisor.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import subprocess
import time

from blockmirror.errors import InvalidInputError
from blockmirror.frontend.plugin import NBDFUSE_HINT, program
from blockmirror.frontend.process import Child

_POLL_S = 0.01


def _umount(path: str) -> int:
    """umount2(PATH, 0); 0 or the errno."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(path), 0) == 0:
        return 0
    return ctypes.get_errno()


class FuseFile:
    """The export as the plain file DIR/NAME."""

    def __init__(self, folder: str, name: str) -> None:
        self.folder = os.path.abspath(folder)
        self.path = os.path.join(self.folder, name)
        self.child: Child | None = None
        self._nbdfuse = ""

    def check(self) -> None:
        """Bad input before anything is started."""
        if not os.path.isdir(self.folder):
            raise InvalidInputError(f"--fuse {self.folder} is not a folder")
        if os.listdir(self.folder):
            raise InvalidInputError(f"--fuse {self.folder} is not empty (the mount would "
                                    "hide what is in it)")
        self._nbdfuse = program("nbdfuse", NBDFUSE_HINT)
        if not os.path.exists("/dev/fuse"):
            raise InvalidInputError("serve --fuse needs /dev/fuse (FUSE is not available here)")
        if os.geteuid() != 0 and shutil.which("fusermount3") is None:
            raise InvalidInputError("serve --fuse needs root here (nbdfuse mounts through "
                                    "fusermount3 otherwise, which is not installed)")

    def start(self, uri: str, timeout: float) -> None:
        """Run nbdfuse and wait until the file is there."""
        setpriv = shutil.which("setpriv")
        guard = [setpriv, "--pdeathsig", "TERM"] if setpriv else []
        self.child = Child("nbdfuse", [*guard, self._nbdfuse, self.path, uri])
        deadline = time.monotonic() + timeout
        while not self._mounted():
            if not self.child.running():
                raise OSError(errno.EIO, f"nbdfuse could not mount {self.path}: "
                              f"{self.child.problem() or self.child.exit_description()}")
            if time.monotonic() > deadline:
                raise OSError(errno.ETIMEDOUT, "nbdfuse did not mount the file in time",
                              self.path)
            time.sleep(_POLL_S)
        self.child.forward = True

    def _mounted(self) -> bool:
        try:
            here = os.stat(self.folder)
            parent = os.stat(os.path.dirname(self.folder))
        except OSError:
            return False
        return here.st_dev != parent.st_dev and os.path.exists(self.path)

    def try_unmount(self) -> bool:
        """Unmount unless the file is in use; True once unmounted (or never was)."""
        if self.child is None or not self.child.running():
            return True
        code = _umount(self.folder)
        if code in (0, errno.EINVAL):  # EINVAL: not mounted (any more)
            return True
        if code == errno.EBUSY:
            return False
        # Not ours to unmount (not root: fusermount3 mounted it) or a failure:
        # nbdfuse detaches it itself.
        return self.force_unmount()

    def force_unmount(self) -> bool:
        """Detach the mount even if in use: its users get ENOTCONN."""
        if self.child is not None:
            self.child.stop(timeout=10.0)  # nbdfuse detaches lazily on SIGTERM
        return True

    def stop(self) -> None:
        """After the unmount: wait for nbdfuse to exit. Idempotent."""
        if self.child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.child.proc.wait(timeout=10.0)
            self.child.stop(timeout=10.0)
