"""``blockmirror serve``: the supervisor of one export.

Every check runs before anything is created (bad input: InvalidInputError,
nothing left behind). Then, each step undone on any failure: the pidfile,
tracking (when the image had none), the listening end, nbdkit with the plugin
(in the foreground, under this process, gone with it), the fuse file. Once
the export accepts, its URI is announced; the supervisor waits for SIGINT,
SIGTERM or SIGHUP and stops in order: the fuse file unmounted first (waiting
while it is in use), nbdkit told to stop (it drains in-flight requests and
the plugin closes the sidecar clean), the socket and pidfile removed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import selectors
import signal
import sys
import time
from types import FrameType, TracebackType
from typing import TextIO

from blockmirror.errors import BlockMirrorError, InvalidInputError
from blockmirror.frontend import daemon
from blockmirror.frontend.endpoint import Endpoint, TcpEndpoint, UnixEndpoint
from blockmirror.frontend.fuse import FuseFile
from blockmirror.frontend.plugin import (
    NBDKIT_HINT,
    nbdkit_command,
    plugin_path,
    program,
    served_elsewhere,
)
from blockmirror.frontend.process import Child
from blockmirror.tracking.tracker import Tracker, sidecar_path

STARTUP_TIMEOUT_S = 30.0
# nbdkit drains in-flight requests on SIGTERM; a write held by a freeze
# waits at most the lease (60 s), so this is generous.
DRAIN_TIMEOUT_S = 120.0
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class ServeError(BlockMirrorError):
    """nbdkit or nbdfuse failed to start, or died while serving."""


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    image: str
    socket: str | None = None  # unix socket path; None: a private one
    port: int | None = None  # TCP instead of a unix socket
    bind: str = "127.0.0.1"
    readonly: bool = False
    fuse_dir: str | None = None
    pidfile: str | None = None
    foreground: bool = False


@dataclasses.dataclass
class _Plan:
    """What check() found: everything needed, nothing created yet."""

    options: ServeOptions
    image: str
    nbdkit: str
    plugin: str
    endpoint: Endpoint
    fuse: FuseFile | None


def check(options: ServeOptions) -> _Plan:
    """Every bad input, before anything is created."""
    nbdkit = program("nbdkit", NBDKIT_HINT)
    plugin = plugin_path()
    image = os.path.abspath(options.image)
    if served_elsewhere(image, readonly=options.readonly):
        raise InvalidInputError(f"{image} is already served by another blockmirror serve")
    if os.path.lexists(sidecar_path(image)):
        _check_sidecar(image)
    endpoint: Endpoint = (UnixEndpoint(options.socket) if options.port is None
                          else TcpEndpoint(options.port, options.bind))
    endpoint.check()
    fuse = None
    if options.fuse_dir is not None:
        fuse = FuseFile(options.fuse_dir, os.path.basename(image))
        fuse.check()
    if options.pidfile is not None:
        daemon.check_pidfile(options.pidfile)
        options = dataclasses.replace(options, pidfile=os.path.abspath(options.pidfile))
    return _Plan(options, image, nbdkit, plugin, endpoint, fuse)


def _check_sidecar(image: str) -> None:
    """Refuse here a sidecar the plugin would refuse as a writer."""
    with Tracker.open(image) as tracker:  # raises for a foreign, corrupt or unsafe one
        if tracker.info().not_this_image:
            raise InvalidInputError(f"sidecar {tracker.path} was made for another file, not "
                                    "this image: remove it, or accept it with blockmirror "
                                    "track reset")


def serve(options: ServeOptions, out: TextIO | None = None) -> int:
    """Serve OPTIONS.image until told to stop (foreground), or start the
    server detached and return once it is up. Prints the NBD URI (and the
    fuse file's path) on OUT; returns the exit status."""
    out = sys.stdout if out is None else out
    plan = check(options)
    if options.foreground:
        def announce(lines: list[str]) -> None:
            print("\n".join(lines), file=out, flush=True)

        return Supervisor(plan).run(announce)
    for line in daemon.detach(Supervisor(plan).run):
        print(line, file=out)
    out.flush()
    return 0


class _StopRequests:
    """SIGINT, SIGTERM and SIGHUP counted (not raised) while serving; ``fd``
    becomes readable at each one."""

    def __init__(self) -> None:
        self.count = 0
        self.fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._previous: dict[int, object] = {}
        self._previous_wakeup = -1

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1

    def __enter__(self) -> _StopRequests:
        for sig in _STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        self._previous_wakeup = signal.set_wakeup_fd(self._write_fd)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        signal.set_wakeup_fd(self._previous_wakeup)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        os.close(self.fd)
        os.close(self._write_fd)

    def wait(self, timeout: float) -> None:
        """Sleep up to TIMEOUT seconds, less if a signal comes."""
        with selectors.DefaultSelector() as sel:
            sel.register(self.fd, selectors.EVENT_READ)
            sel.select(timeout)
        self.drain()

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self.fd, 256):
                pass


class Supervisor:
    """Starts, watches and stops the processes of one export."""

    def __init__(self, plan: _Plan) -> None:
        self.plan = plan
        self.nbdkit: Child | None = None
        self._announced = False

    def run(self, announce: daemon.Announce) -> int:
        """Start everything, ANNOUNCE the lines to print, serve until a stop
        request (0) - or raise ServeError when nbdkit or nbdfuse dies."""
        with contextlib.ExitStack() as undo:
            self._start(undo)
            lines = [self.plan.endpoint.uri]
            if self.plan.fuse is not None:
                lines.append(self.plan.fuse.path)
            with _StopRequests() as stop:  # from the announcement on, a signal is a stop request
                announce(lines)
                self._announced = True
                died = self._wait_for_the_end(stop)
                self._stop_in_order(stop)
            if died is not None:
                raise ServeError(self._death_report(died))
        return 0

    def _start(self, undo: contextlib.ExitStack) -> None:
        plan = self.plan
        if plan.options.pidfile is not None:
            ident = daemon.write_pidfile(plan.options.pidfile)
            undo.callback(daemon.remove_pidfile, plan.options.pidfile, ident)
        if not os.path.lexists(sidecar_path(plan.image)):
            Tracker.create(plan.image).close()
            undo.callback(self._remove_new_sidecar)
        plan.endpoint.prepare()
        undo.callback(plan.endpoint.remove)
        self.nbdkit = Child("nbdkit", nbdkit_command(
            plan.nbdkit, plan.plugin, plan.image, plan.endpoint.nbdkit_args(),
            readonly=plan.options.readonly))
        undo.callback(self.nbdkit.stop, DRAIN_TIMEOUT_S)
        self._wait_until_accepting(self.nbdkit)
        plan.endpoint.publish()
        self.nbdkit.forward = True
        if plan.fuse is not None:
            undo.callback(plan.fuse.force_unmount)
            plan.fuse.start(plan.endpoint.uri, STARTUP_TIMEOUT_S)

    def _wait_until_accepting(self, nbdkit: Child) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self.plan.endpoint.accepts():
            if not nbdkit.running():
                raise self._startup_failure(nbdkit)
            if time.monotonic() > deadline:
                raise ServeError(f"nbdkit did not start listening within "
                                 f"{STARTUP_TIMEOUT_S:.0f} s")
            time.sleep(0.01)

    def _startup_failure(self, nbdkit: Child) -> Exception:
        """What nbdkit's early exit means, as the error to report."""
        if nbdkit.said("already served"):
            return InvalidInputError(f"{self.plan.image} is already served by another "
                                     "blockmirror serve")
        if nbdkit.said("change-tracking sidecar"):  # the plugin refused it: bad input
            return InvalidInputError(nbdkit.problem().removeprefix("nbdkit: error: "))
        endpoint = self.plan.endpoint
        if isinstance(endpoint, TcpEndpoint) and nbdkit.said("Address already in use"):
            return InvalidInputError(endpoint.bind_failure(errno.EADDRINUSE))
        return ServeError(f"nbdkit could not serve {self.plan.image}: "
                          f"{nbdkit.problem() or nbdkit.exit_description()}")

    def _remove_new_sidecar(self) -> None:
        """On a failed start, the sidecar this run created goes again (unless
        a writer opened it meanwhile)."""
        if self._announced:
            return
        with Tracker.open(self.plan.image) as tracker:
            if tracker.live_writers():
                return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sidecar_path(self.plan.image))

    def _wait_for_the_end(self, stop: _StopRequests) -> Child | None:
        """Until a stop request (None) or a helper exits on its own (it)."""
        assert self.nbdkit is not None
        children = [self.nbdkit]
        if self.plan.fuse is not None and self.plan.fuse.child is not None:
            children.append(self.plan.fuse.child)
        with selectors.DefaultSelector() as sel:
            sel.register(stop.fd, selectors.EVENT_READ)
            for child in children:
                sel.register(child.pidfd, selectors.EVENT_READ, child)
            while True:
                sel.select()
                stop.drain()
                if stop.count:
                    return None
                for child in children:
                    if not child.running():
                        return child

    def _stop_in_order(self, stop: _StopRequests) -> None:
        """The fuse file first (its users must not lose writes), then nbdkit."""
        fuse = self.plan.fuse
        if fuse is not None:
            self._unmount(fuse, stop)
        assert self.nbdkit is not None
        self.nbdkit.stop(DRAIN_TIMEOUT_S)

    def _unmount(self, fuse: FuseFile, stop: _StopRequests) -> None:
        asked = stop.count
        told = False
        while not fuse.try_unmount():
            if stop.count > asked:
                fuse.force_unmount()
                break
            if not told:
                _notice(f"{fuse.path} is in use (an open file or a loop device); stopping "
                        "once it is released (signal again to detach it anyway)")
                told = True
            stop.wait(0.5)
        fuse.stop()

    def _death_report(self, child: Child) -> str:
        message = f"{child.name} {child.exit_description()} while serving; the export is gone"
        problem = child.problem()
        if problem:
            message += f" ({problem})"
        with contextlib.suppress(OSError), Tracker.open(self.plan.image) as tracker:
            if not tracker.consistent:
                message += "; the sidecar is unclean: the next sync copies everything"
        return message


def _notice(message: str) -> None:
    print(f"blockmirror: {message}", file=sys.stderr, flush=True)

