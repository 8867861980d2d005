"""The ``blockmirror`` command.

Exit codes (also in --help and the README):
  0 ok · 1 I/O error · 2 bad usage or input · 3 not converged
  4 out of space · 5 images differ (verify) · 130 SIGINT · 143 SIGTERM
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import dataclasses
import errno
import json
import os
import signal
import stat
import sys
from collections.abc import Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

from blockmirror import files
from blockmirror.errors import (
    BlockMirrorError,
    ChangeIdInvalidError,
    InvalidInputError,
    NotConvergedError,
    OutOfSpaceError,
    SidecarError,
)
from blockmirror.units import (
    format_bytes,
    format_seconds,
    int_argument,
    parse_duration,
    parse_size,
    size_argument,
)

if TYPE_CHECKING:
    from pathlib import Path  # imported where used: only `bench` needs it

EXIT_OK = 0
EXIT_IO = 1
EXIT_USAGE = 2
EXIT_NOT_CONVERGED = 3
EXIT_NO_SPACE = 4
EXIT_DIFFERENT = 5
EXIT_SIGINT = 130
EXIT_SIGTERM = 143

EXIT_CODES_HELP = """exit codes:
  0    success
  1    I/O error (the destination side was removed, the source untouched)
  2    bad usage or input (nothing was created)
  3    not converged: writes outpace the copy (source untouched, writers never paused)
  4    out of space at the destination (partial copy removed)
  5    images differ (verify)
  130  interrupted (SIGINT), 143 terminated (SIGTERM): cleaned up as for 1
"""


class Terminated(BaseException):
    """SIGTERM arrived; unwinds like KeyboardInterrupt so cleanup runs."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _short(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:37] + "...")


_positive_int = int_argument(1, 1_000_000)
_workers = int_argument(1, 256)


def _bounded_duration(high: float) -> Any:
    def parse(text: str) -> float:
        value = _duration(text)
        if value > high:
            raise argparse.ArgumentTypeError(
                f"at most {format_seconds(high)}: {_short(text)}")
        return value
    return parse


_size = size_argument  # the name the parsers below use


DEMO_MIN_SIZE = 16 << 20
DEMO_MAX_SIZE = 64 << 30
DEMO_MAX_RATE = 16 << 30


def _demo_size(text: str) -> int:
    value = _size(text)
    if not DEMO_MIN_SIZE <= value <= DEMO_MAX_SIZE:
        raise argparse.ArgumentTypeError(f"the demo image must be 16M to 64G: {_short(text)}")
    return value


def _demo_rate(text: str) -> int:
    value = _size(text)
    if value > DEMO_MAX_RATE:
        raise argparse.ArgumentTypeError(f"at most 16G per second: {_short(text)}")
    return value


def _granularity(text: str) -> int:
    # Late, like every import of the C core here: --help and usage errors
    # must not pay for loading it (and numpy).
    from blockmirror.tracking.tracker import MAX_GRANULARITY, MIN_GRANULARITY

    try:
        value = parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if (
        value < MIN_GRANULARITY
        or value > MAX_GRANULARITY
        or value & (value - 1)
    ):
        raise argparse.ArgumentTypeError(
            f"granularity must be a power of two from 4k to 64M, got {text!r}"
        )
    return value


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line's parser; for a known COMMAND, only the parsers of
    that command's group (each add_argument costs a help formatter: the
    whole tree was ~2 ms of every command's start)."""
    parser = argparse.ArgumentParser(
        prog="blockmirror",
        description="Copy a live disk image exactly, with writers paused as briefly as possible.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups = (_add_sync_parser, _add_tracking_parsers, _add_serve_parser, _add_demo_parser,
              _add_bench_parser)
    for add in groups:
        if command is None or command in _GROUP_COMMANDS[add.__name__]:
            add(sub)
    return parser


# Which commands each _add_*_parser adds (build_parser builds one group).
_GROUP_COMMANDS = {
    "_add_sync_parser": ("sync",), "_add_tracking_parsers": ("track", "changed", "verify"),
    "_add_serve_parser": ("serve",), "_add_demo_parser": ("demo",),
    "_add_bench_parser": ("bench",),
}


def _add_sync_parser(sub: Any) -> None:
    p = sub.add_parser(
        "sync", help="copy or move a live image (or a folder of them)",
        epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Bulk-copy SRC to DST, re-copy blocks written meanwhile until the rest "
        "fits in the target downtime, then pause writers and switch over.",
    )
    p.add_argument("src", help="source image (or folder, for directory mode), or an nbd:// "
                   "export to copy once into a local file")
    p.add_argument("dst", help="destination image path, an existing folder, or an nbd:// "
                   "export")
    p.add_argument("--target-downtime", type=_bounded_duration(3600.0), default=5.0,
                   metavar="TIME",
                   help="longest pause for writers, e.g. 5s, 200ms (default 5s)")
    p.add_argument("--max-passes", type=_positive_int, default=30, metavar="N",
                   help="give up after N passes (default 30)")
    p.add_argument("--move", action="store_true",
                   help="move: redirect writers to the copy and remove the source")
    p.add_argument("--verify", action="store_true", help="compare the copy with the source")
    p.add_argument("--force", action="store_true", help="replace an existing destination")
    p.add_argument("--converge", choices=("fail", "throttle", "mirror", "auto"), default="fail",
                   help="when writes outpace the copy: fail (default), throttle writers, "
                   "mirror their writes into the copy, or auto: escalate to mirror (or to "
                   "the throttle if the copy cannot take the writes) when the passes' trend "
                   "says they will not converge")
    p.add_argument("--defer-hot", action="store_true",
                   help="leave blocks dirtied pass after pass for the final pass instead of "
                   "copying them every pass (experimental)")
    p.add_argument("--workers", type=_workers, default=4, metavar="N",
                   help="copy requests in flight, 1 to 256 (default 4)")
    p.add_argument("--bwlimit", type=_size, metavar="RATE",
                   help="cap copy bandwidth, e.g. 50M (bytes/s; holes are free)")
    p.add_argument("--requests", type=int_argument(1, 256), metavar="N",
                   help="nbd:// only: NBD requests of 256 KiB in flight per connection "
                   "(default 32; a long round trip needs more, see bench/README.md)")
    p.add_argument("--quiesced", action="store_true",
                   help="nbd:// source only: nothing writes the export during the copy "
                   "(its writers are not tracked; a read-only export needs no flag)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")


def _add_tracking_parsers(sub: Any) -> None:
    """track, changed and verify: the commands of backup tooling."""
    t = sub.add_parser("track", help="enable, disable or show change tracking of an image")
    t.add_argument("action", choices=("enable", "disable", "status", "reset"),
                   help="reset: accept an unclean sidecar (a writer died): a new series with "
                   "every block dirty; earlier change ids become invalid")
    t.add_argument("image")
    t.add_argument("--granularity", type=_granularity, default=None,
                   help="bytes per tracked block, a power of two (default 64k)")
    t.add_argument("--json", action="store_true")

    c = sub.add_parser("changed", help="list what was written since a change id",
                       epilog="A change id comes from a copy's --json result (change_id) or "
                       "from Tracker.change_id(); '*' lists every allocated extent. Exit 2 "
                       "when the id cannot be trusted: take a full copy then.")
    c.add_argument("image")
    c.add_argument("--since", required=True, metavar="ID")
    c.add_argument("--new-id", action="store_true",
                   help="also take a new change id (printed with --json) for the next query")
    c.add_argument("--json", action="store_true")

    v = sub.add_parser("verify", help="compare two images block by block",
                       epilog=EXIT_CODES_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("a")
    v.add_argument("b")
    v.add_argument("--json", action="store_true")


def _add_serve_parser(sub: Any) -> None:
    s = sub.add_parser(
        "serve", help="serve an image over NBD, every write tracked (nbdkit)",
        description="Export IMAGE over NBD through nbdkit and blockmirror's plugin, so any NBD "
        "client (QEMU, fio, qemu-io, nbdfuse) is a tracked writer. Prints the NBD URI (and, "
        "with --fuse, the file's path); stop it with SIGINT or SIGTERM.",
        epilog="exit codes: 0 stopped on request · 1 nbdkit or nbdfuse failed or died · "
        "2 bad input (nothing was created)",
    )
    s.add_argument("image")
    where = s.add_mutually_exclusive_group()
    where.add_argument("--socket", metavar="PATH",
                       help="unix socket to create, mode 0600 (default: a private one)")
    where.add_argument("--port", type=int_argument(1, 65535), metavar="N",
                       help="listen on TCP port N instead (127.0.0.1 unless --bind)")
    s.add_argument("--bind", metavar="ADDR", help="address to listen on with --port")
    s.add_argument("--readonly", action="store_true", help="refuse writes")
    s.add_argument("--fuse", metavar="DIR",
                   help="also show the export as the plain file DIR/NAME (nbdfuse)")
    s.add_argument("--pidfile", metavar="FILE", help="write the server's pid here")
    s.add_argument("--foreground", action="store_true",
                   help="stay attached (default: detach once the export is up)")


def _add_demo_parser(sub: Any) -> None:
    d = sub.add_parser("demo", help="sync a built-in demo image under a live writer")
    d.add_argument("--dir", help="work in this folder (default: a new temporary one, removed)")
    d.add_argument("--size", type=_demo_size, default=512 << 20,
                   help="apparent size of the demo image, 16M to 64G (default 512M)")
    d.add_argument("--rate", type=_demo_rate, default=16 << 20,
                   help="writer rate during the copy, bytes/s (default 16M)")
    d.add_argument("--target-downtime", type=_bounded_duration(3600.0), default=0.2,
                   metavar="TIME")
    d.add_argument("--json", action="store_true")


# The commands whose process ends without the interpreter's teardown (see
# entry): everything they must do is done, and checked, before main returns.
_QUICK_EXIT = ("sync", "verify")


def entry() -> NoReturn:
    """The process's entry (``python -m blockmirror``, the console script).

    A sync or verify ends the process as soon as its output is flushed: the
    interpreter's teardown (freeing every module's objects, numpy's among
    them) took ~25 ms of a 0.25 s sync, for nothing the command needs. By
    then the copy is fsynced, committed and its manifest published, every
    file of ours is closed and every worker thread joined; the kernel drops
    the rest. If a thread of ours were still running, or for any other
    command, the process ends the ordinary way."""
    argv = sys.argv[1:]
    quick = bool(argv) and argv[0] in _QUICK_EXIT
    if quick:
        # numpy's OpenBLAS starts a thread per core at load, which spins
        # (4.8 % of a 1 GiB sync's samples, perf) on the cores the copy
        # needs; blockmirror never calls BLAS. The user's setting wins.
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    code = main(argv)
    if quick:
        _end_now(code)
    sys.exit(code)


def _end_now(code: int) -> NoReturn:
    import atexit
    import threading

    if threading.active_count() > 1:
        sys.exit(code)  # the ordinary exit waits for it
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            code = code or 120  # what the interpreter exits with when stdout fails
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    # First thing: a SIGTERM from here on unwinds through the cleanup (exit
    # 143) instead of killing the process with -15.
    signal.signal(signal.SIGTERM, _on_sigterm)
    _tolerant_output()
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        known = argv[0] if argv and any(argv[0] in c for c in _GROUP_COMMANDS.values()) else None
        parser = build_parser(known)
        args = parser.parse_args(argv)
        if args.command == "sync":
            return _cmd_sync(args)
        if args.command == "track":
            return _cmd_track(args)
        if args.command == "verify":
            return _cmd_verify(args)
        if args.command == "changed":
            return _cmd_changed(args)
        if args.command == "serve":
            return _cmd_serve(args)
        if args.command == "demo":
            from blockmirror.cli.demo import run_demo  # late: most commands never need it

            return run_demo(args)
        if args.command == "bench":
            return _cmd_bench(args)
        parser.error(f"unknown command {args.command}")
    except KeyboardInterrupt:
        _err("interrupted; cleaned up, the source is untouched")
        return EXIT_SIGINT
    except Terminated:
        _err("terminated; cleaned up, the source is untouched")
        return EXIT_SIGTERM
    except BlockMirrorError as e:
        return _report_error(e)
    except OSError as e:
        return _report_error(e)
    except MemoryError:
        _err("out of memory")
        return EXIT_IO
    return EXIT_OK


def _path_safe_errors(exc: UnicodeError) -> tuple[str, int]:
    """An output error handler that never fails: the bytes of a path that was
    not valid UTF-8 (surrogate escapes) go out as they came in, anything else
    unencodable as a backslash escape."""
    if isinstance(exc, UnicodeEncodeError):
        try:
            return codecs.lookup_error("surrogateescape")(exc)  # type: ignore[return-value]
        except UnicodeError:
            return codecs.lookup_error("backslashreplace")(exc)  # type: ignore[return-value]
    raise exc


def _tolerant_output() -> None:
    """Printing a file name that is not valid in the locale's encoding (say a
    Latin-1 name under a strict UTF-8 locale) must never fail a finished
    command."""
    with contextlib.suppress(LookupError):
        codecs.lookup_error("blockmirror-paths")
        return
    codecs.register_error("blockmirror-paths", _path_safe_errors)
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            with contextlib.suppress(Exception):
                reconfigure(errors="blockmirror-paths")


def exit_code_for(exc: BaseException) -> int:
    if isinstance(exc, OutOfSpaceError):
        return EXIT_NO_SPACE
    if isinstance(exc, InvalidInputError):
        return EXIT_USAGE
    if isinstance(exc, NotConvergedError):
        return EXIT_NOT_CONVERGED
    if isinstance(exc, (SidecarError, ChangeIdInvalidError)):
        return EXIT_USAGE
    from blockmirror.migration.manifest import ManifestError

    if isinstance(exc, ManifestError):  # refused manifest, another sync's, a planted file
        return EXIT_USAGE
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return EXIT_NO_SPACE
    if isinstance(exc, OSError) and exc.errno in (errno.EROFS, errno.ELOOP, errno.ENOTDIR,
                                                    errno.ENAMETOOLONG):
        return EXIT_USAGE  # a read-only filesystem, a planted link: bad input
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError,
                        NotADirectoryError, FileExistsError)):
        return EXIT_USAGE
    return EXIT_IO


def _report_error(exc: BaseException) -> int:
    if isinstance(exc, OSError) and exc.strerror:
        filename = exc.filename
        if isinstance(filename, bytes):
            filename = os.fsdecode(filename)
        name = "" if filename is None else str(filename)
        where = f": {name}" if name and name not in str(exc.strerror) else ""
        message = f"{exc.strerror}{where}"
    else:
        message = str(exc)
    _err(message)
    return exit_code_for(exc)


def _err(message: str) -> None:
    print(f"blockmirror: {message}", file=sys.stderr)


def _cmd_sync(args: argparse.Namespace) -> int:
    from blockmirror.cli.progress import ProgressLine
    from blockmirror.migration import sync

    _check_nbd_only_options(args)
    progress = None if (args.quiet or args.json) else ProgressLine(sys.stderr)
    result = sync(
        args.src, args.dst, target_downtime=args.target_downtime,
        mode="move" if args.move else "copy", max_passes=args.max_passes, verify=args.verify,
        progress=progress, force=args.force, workers=args.workers, converge=args.converge,
        rate_limit=args.bwlimit, defer_hot=args.defer_hot, requests=args.requests,
        quiesced=args.quiesced,
    )
    if args.json:
        print(json.dumps(result.to_dict()))
    elif not args.quiet:
        print(result.summary())
        for note in result.notes:
            print(f"  note: {note}")
    return EXIT_OK


def _check_nbd_only_options(args: argparse.Namespace) -> None:
    from blockmirror.copying.uri_names import looks_like_uri

    if args.requests is not None and not (looks_like_uri(args.src) or looks_like_uri(args.dst)):
        raise InvalidInputError("--requests applies to nbd:// endpoints only "
                                "(a local copy's requests are --workers)")
    if args.quiesced and not looks_like_uri(args.src):
        raise InvalidInputError("--quiesced applies to an nbd:// source only "
                                "(a local source's writers are tracked)")


def _check_image_arg(image: str, *, for_create: bool = False) -> None:
    """IMAGE is a regular file on real storage and not one of blockmirror's
    own files: tracking a FIFO, a device, a /proc file or a sidecar (which
    would make X.cbt.cbt) is bad input, not an I/O error."""
    from blockmirror.migration.precheck import on_pseudo_filesystem, own_file_kind

    if image == "":
        raise InvalidInputError("image must not be empty")
    try:
        st = os.stat(image)
    except FileNotFoundError:
        raise InvalidInputError(f"image {image} does not exist") from None
    if stat.S_ISDIR(st.st_mode):
        raise InvalidInputError(f"image {image} is a folder")
    if not stat.S_ISREG(st.st_mode):
        raise InvalidInputError(f"image {image} is not a regular file (a device, FIFO or socket)")
    if on_pseudo_filesystem(image):
        raise InvalidInputError(f"image {image} is on a pseudo filesystem (/proc, /sys)")
    for name in (image, os.path.realpath(image)):
        kind = own_file_kind(name)
        if kind is not None:
            raise InvalidInputError(f"{image} is a blockmirror {kind}, not an image")
    if for_create and os.statvfs(image).f_flag & os.ST_RDONLY:
        raise InvalidInputError(f"image {image} is on a read-only filesystem")


def _cmd_track(args: argparse.Namespace) -> int:
    _check_image_arg(args.image, for_create=args.action == "enable")
    actions = {"enable": _track_enable, "disable": _track_disable, "reset": _track_reset,
               "status": _track_status}
    return actions[args.action](args)


def _track_enable(args: argparse.Namespace) -> int:
    from blockmirror.tracking.tracker import DEFAULT_GRANULARITY, Tracker, sidecar_path

    Tracker.create(args.image, args.granularity or DEFAULT_GRANULARITY).close()
    if args.json:
        print(json.dumps({"image": args.image, "sidecar": sidecar_path(args.image),
                          "tracking": True}))
    else:
        print(f"tracking {args.image} in {sidecar_path(args.image)}")
    return EXIT_OK


def _track_disable(args: argparse.Namespace) -> int:
    import fcntl

    from blockmirror.tracking.tracker import Tracker, sidecar_path

    sidecar = sidecar_path(args.image)
    with Tracker.open(args.image) as tracker:
        writers = tracker.live_writers()
        if writers:
            raise InvalidInputError(
                f"{writers} writers still have {tracker.path} open; stop them first"
            )
    # A sync holds an flock on the sidecar for its whole run: removing the
    # sidecar under it would let a later writer start a fresh one the
    # sync never sees (lost writes). Hold the lock ourselves while we
    # unlink, so no sync can start in between either.
    try:
        lock_fd = os.open(sidecar, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InvalidInputError(f"{args.image} is not tracked") from None
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InvalidInputError(
                f"a sync of {args.image} is running (it holds {sidecar}); tracking "
                "cannot be disabled until it ends"
            ) from None
        st = os.fstat(lock_fd)
        now = os.lstat(sidecar)
        if (st.st_dev, st.st_ino) != (now.st_dev, now.st_ino):
            raise InvalidInputError(f"{sidecar} changed while it was being removed; "
                                    "try again")
        os.unlink(sidecar)
    finally:
        os.close(lock_fd)
    if args.json:
        print(json.dumps({"image": args.image, "sidecar": sidecar, "tracking": False}))
    else:
        print(f"tracking of {args.image} disabled")
    return EXIT_OK


def _track_reset(args: argparse.Namespace) -> int:
    from blockmirror.tracking.tracker import Tracker

    with Tracker.open(args.image) as tracker:
        was_clean = tracker.consistent
        tracker.reset()
        series = tracker.series
    if args.json:
        print(json.dumps({"image": args.image, "was_consistent": was_clean,
                          "series": series}))
    else:
        state = "was consistent" if was_clean else "was unclean"
        print(f"tracking of {args.image} reset ({state}); new series {series}, "
              "every block dirty")
    return EXIT_OK


def _track_status(args: argparse.Namespace) -> int:
    from blockmirror.tracking.tracker import Tracker, sidecar_path

    with Tracker.open(args.image) as tracker:
        info: dict[str, Any] = dataclasses.asdict(tracker.info())
        info["consistent"] = tracker.consistent
        info["dirty_bytes"] = tracker.dirty_bytes()
    info["sidecar"] = sidecar_path(args.image)
    # A freeze binds writers only while its copier lives and maps the sidecar
    # (I3); a killed copier's freeze stays in the block until the next write.
    st = os.stat(info["sidecar"])
    info["freeze_void"] = info["state"] in ("freezing", "frozen") and not files.process_maps(
        info["copier_pid"], st.st_dev, st.st_ino)
    if args.json:
        print(json.dumps(info))
    else:
        print(f"image        {args.image}")
        print(f"sidecar      {info['sidecar']}")
        print("consistent   " + ("yes" if info["consistent"] else
                                   "NO: a writer died, the image was written untracked or the "
                                   "eras are damaged; reset needed"))
        print(f"series       {info['series']}  generation {info['generation']}")
        print("change ids   valid" if info["consistent"] else
              "change ids   all invalid (blockmirror track reset IMG, then take a full copy)")
        print(f"granularity  {format_bytes(int(info['granularity']))}")
        print(f"image size   {format_bytes(int(info['image_size']))}")
        print(f"dirty        {format_bytes(int(info['dirty_bytes']))}")
        void = " (void: its copier is gone; writers are not held)" if info["freeze_void"] else ""
        print(f"state        {info['state']}{void}, {info['live_writers']} writer slots held")
    return EXIT_OK


def _cmd_changed(args: argparse.Namespace) -> int:
    from blockmirror.tracking.tracker import Tracker

    _check_image_arg(args.image)
    with Tracker.open(args.image) as tracker:
        new_id = tracker.change_id() if args.new_id else None
        extents = tracker.changed_extents(args.since)
    total = sum(length for _, length in extents)
    if args.json:
        print(json.dumps({"since": args.since, "extents": extents, "bytes": total,
                          "new_change_id": new_id}))
    else:
        for offset, length in extents:
            print(f"{offset} {length}")
        print(f"# {len(extents)} extents, {format_bytes(total)} changed since {args.since}",
              file=sys.stderr)
        if new_id:
            print(f"# new change id {new_id}", file=sys.stderr)
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace) -> int:
    from blockmirror.copying.uri_names import looks_like_uri
    from blockmirror.copying.verify import compare_files
    from blockmirror.migration.precheck import on_pseudo_filesystem

    if looks_like_uri(args.a) or looks_like_uri(args.b):  # an NBD export on a side
        from blockmirror.copying.remote_compare import compare_endpoints

        return _print_verify(args, compare_endpoints(args.a, args.b))
    for path in (args.a, args.b):
        if not os.path.isfile(path):
            raise InvalidInputError(f"{path} is not a regular file")
        if on_pseudo_filesystem(path):
            # /proc and /sys files say size 0 (or 4096) whatever they hold:
            # comparing by size and holes would call them identical.
            raise InvalidInputError(f"{path} is on a pseudo filesystem (/proc, /sys)")
    return _print_verify(args, compare_files(args.a, args.b))


def _print_verify(args: argparse.Namespace, differing: list[tuple[int, int]]) -> int:
    if args.json:
        print(json.dumps({"identical": not differing, "differing": differing}))
    elif differing:
        total = sum(length for _, length in differing)
        print(f"images differ: {len(differing)} extents, {format_bytes(total)}")
        for off, length in differing[:20]:
            print(f"  {off}+{length}")
    else:
        print("images are identical")
    return EXIT_DIFFERENT if differing else EXIT_OK


def _cmd_serve(args: argparse.Namespace) -> int:
    from blockmirror.frontend.serve import ServeOptions, serve

    if args.bind is not None and args.port is None:
        raise InvalidInputError("--bind needs --port (a unix socket has no address)")
    _check_image_arg(args.image, for_create=True)
    return serve(ServeOptions(
        image=args.image, socket=args.socket, port=args.port, bind=args.bind or "127.0.0.1",
        readonly=args.readonly, fuse_dir=args.fuse, pidfile=args.pidfile,
        foreground=args.foreground))


# -- blockmirror bench: a thin entry to the harnesses in the repository's bench/ --


class _PassThroughParser(argparse.ArgumentParser):
    """Hands every argument after the benchmark's name to the benchmark's own
    parser (which also answers --help)."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        namespace = namespace or argparse.Namespace()
        namespace.bench_args = list(args or [])
        return namespace, []


def _add_bench_parser(sub: Any) -> None:
    b = sub.add_parser("bench", help="benchmarks (run from a source checkout: code in bench/)")
    bench_sub = b.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK",
                                 parser_class=_PassThroughParser)
    bench_sub.add_parser("convergence", add_help=False,
                         help="convergence vs write rate, against a model and QEMU's mirror "
                         "(blockmirror bench convergence --help)")
    bench_sub.add_parser("nbd", add_help=False,
                         help="fio over NBD: blockmirror serve vs nbdkit file vs qemu-nbd "
                         "(blockmirror bench nbd --help)")


def bench_folder() -> Path:
    """The repository's bench/ folder (it is not installed with the package)."""
    from pathlib import Path

    import blockmirror

    root = Path(blockmirror.__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file() or not (
        root / "bench" / "convergence" / "harness.py"
    ).is_file():
        raise InvalidInputError(
            f"the benchmarks live in the source repository's bench/ folder, not found beside "
            f"{root}; run from a checkout (pip install -e .)"
        )
    return root / "bench"


def _cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    root = str(bench_folder().parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    harness = importlib.import_module(f"bench.{args.bench_command}.harness")
    return int(harness.main(args.bench_args, prog=f"blockmirror bench {args.bench_command}"))


if __name__ == "__main__":
    sys.exit(main())
