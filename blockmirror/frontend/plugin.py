"""Where the pieces ``serve`` runs come from: nbdkit, nbdfuse and the
plugin built into the package (csrc/nbdkit/plugin.c, compiled by setup.py
only where nbdkit's headers were installed)."""

from __future__ import annotations

import fcntl
import glob
import os
import shutil
import struct

from blockmirror.errors import InvalidInputError

NBDKIT_HINT = ("blockmirror serve needs nbdkit: apt-get install nbdkit nbdkit-plugin-dev, "
               "then reinstall blockmirror")
PLUGIN_HINT = ("the blockmirror nbdkit plugin is not built: apt-get install nbdkit-plugin-dev, "
               "then reinstall blockmirror")
NBDFUSE_HINT = "serve --fuse needs nbdfuse: apt-get install libnbd-bin"


def program(name: str, hint: str) -> str:
    """The absolute path of NAME on PATH, or bad input saying what to install."""
    found = shutil.which(name)
    if found is None:
        raise InvalidInputError(hint)
    return found


def plugin_path() -> str:
    """The plugin shared object inside the installed package."""
    import blockmirror

    folder = os.path.dirname(os.path.abspath(blockmirror.__file__))
    found = sorted(glob.glob(os.path.join(folder, "_nbdkit_plugin*.so")))
    if not found:
        raise InvalidInputError(PLUGIN_HINT)
    return found[0]


def nbdkit_command(nbdkit: str, plugin: str, image: str, listen_args: list[str], *,
                   readonly: bool) -> list[str]:
    """The nbdkit command line: always in the foreground under our
    supervisor, and gone when the supervisor is (--exit-with-parent)."""
    command = [nbdkit, "--foreground", "--exit-with-parent", *listen_args]
    if readonly:
        command.append("-r")
    command += [plugin, f"image={os.path.abspath(image)}"]
    if readonly:
        command.append("readonly=true")
    return command


# struct flock on 64-bit Linux: l_type, l_whence, l_start, l_len, l_pid (+ padding).
_FLOCK = struct.Struct("hhqqi4x")
# The byte the plugin locks to claim an image (SERVE_LOCK_OFFSET in
# csrc/nbdkit/plugin.c): a write lock for a read-write export, a read lock
# for a read-only one, so only read-only exports share an image.
SERVE_LOCK_OFFSET = 1 << 62


def served_elsewhere(image: str, *, readonly: bool) -> bool:
    """True when a running plugin holds IMAGE's serve lock against an export
    of this kind. Asks with F_OFD_GETLK, which takes nothing; False when it
    cannot tell (nbdkit's own refusal is translated then)."""
    try:
        fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        kind = fcntl.F_RDLCK if readonly else fcntl.F_WRLCK
        query = _FLOCK.pack(kind, os.SEEK_SET, SERVE_LOCK_OFFSET, 1, 0)
        answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, query)
        return bool(_FLOCK.unpack(answer)[0] != fcntl.F_UNLCK)
    except OSError:
        return False
    finally:
        os.close(fd)
