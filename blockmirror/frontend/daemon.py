"""Running in the background: the pidfile, and detaching from the shell.

``detach`` forks twice (the supervisor is no session leader and no child of
the shell); the shell's process waits on a pipe until the supervisor has
started everything, prints what it announced - or raises what stopped it, as
if it had happened in the foreground - and returns, so the shell gets its
prompt back only once the export is up. The supervisor then puts its stdio
on /dev/null, opened read-write and never created.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import stat
import sys
import syslog
from collections.abc import Callable

from blockmirror.errors import InvalidInputError, SidecarError

Announce = Callable[[list[str]], None]
"""Called once by the supervisor when the export is up, with the lines to print."""

_PIDFILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def check_pidfile(path: str) -> None:
    if os.path.lexists(path):
        raise InvalidInputError(f"pidfile {path} already exists (another serve running? "
                                "remove it if not)")
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise InvalidInputError(f"the folder of pidfile {path} does not exist")


def write_pidfile(path: str) -> tuple[int, int]:
    """Create PATH exclusively holding our pid; its (device, inode)."""
    try:
        fd = os.open(path, _PIDFILE_FLAGS, 0o644)
    except FileExistsError:
        raise InvalidInputError(f"pidfile {path} already exists") from None
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
        st = os.fstat(fd)
    finally:
        os.close(fd)
    return st.st_dev, st.st_ino


def remove_pidfile(path: str, ident: tuple[int, int]) -> None:
    """Remove PATH if it is still the file write_pidfile made."""
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == ident:
            os.unlink(path)


def quiet_stdio() -> None:
    """stdin, stdout and stderr onto /dev/null (read-write, never created)."""
    fd = os.open(os.devnull, os.O_RDWR)  # no O_CREAT: a missing one is an error
    try:
        if not stat.S_ISCHR(os.fstat(fd).st_mode):
            raise OSError(errno.ENODEV, "not a character device", os.devnull)
        for target in (0, 1, 2):
            os.dup2(fd, target)
    finally:
        if fd > 2:
            os.close(fd)


def _run_supervisor(write_end: int, supervise: Callable[[Announce], int]) -> int:
    """In the detached process: SUPERVISE, reporting to the waiting shell."""
    announced = False

    def announce(lines: list[str]) -> None:
        nonlocal announced
        os.write(write_end, pickle.dumps(lines))
        os.close(write_end)
        announced = True
        sys.stdout.flush()
        quiet_stdio()

    try:
        return supervise(announce)
    except BaseException as e:
        if announced:  # the shell is gone: say it where an operator looks
            syslog.syslog(syslog.LOG_ERR, f"blockmirror serve: {e}")
            return 1
        with contextlib.suppress(OSError):  # the shell's side may be gone (Ctrl-C)
            os.write(write_end, pickle.dumps(_portable(e)))
        return 1


def _portable(exc: BaseException) -> BaseException:
    """EXC, or a stand-in of the kind the command maps to the same exit
    code, when EXC does not survive pickling (a custom __init__)."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        pass
    if isinstance(exc, (InvalidInputError, SidecarError)):
        return InvalidInputError(str(exc))
    if isinstance(exc, OSError):
        return OSError(exc.errno or errno.EIO, exc.strerror or str(exc), exc.filename)
    return OSError(errno.EIO, str(exc) or type(exc).__name__)


def detach(supervise: Callable[[Announce], int]) -> list[str]:
    """Run SUPERVISE in a detached process; the lines it announced, or the
    exception it failed with before announcing, raised here."""
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: it only forks the supervisor and exits
        code = 1
        try:
            os.close(read_end)
            os.setsid()
            os.chdir("/")  # pin no mount (every path was made absolute)
            # The first child leaves at once; its child is the supervisor.
            code = _run_supervisor(write_end, supervise) if os.fork() == 0 else 0
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)
    os.close(write_end)
    chunks = []
    with os.fdopen(read_end, "rb") as pipe:
        while chunk := pipe.read(65536):
            chunks.append(chunk)
    os.waitpid(pid, 0)
    if not chunks:
        raise OSError(errno.EIO, "the detached server died while it started")
    report = pickle.loads(b"".join(chunks))
    if isinstance(report, BaseException):
        raise report
    return list(report)
