"""Throughput of `blockmirror sync` into an NBD export against requests in
flight and round trip (issue 12, "Measure it"): the table that says what
setting a long link needs. `nbdcopy` at the same settings is the baseline,
in the same run, interleaved; the ratio is blockmirror's throughput over
nbdcopy's.

    python bench/remote_inflight.py [--size 256M] [--requests 1 4 16 64]
                                    [--rtt 0.2 1 5] [--connections 4] [--rounds 2]
                                    [--from-export]

Root only: the server, `nbdkit file` with multi-conn, runs in a second
network namespace behind a veth pair (tests/netnstools.py). This kernel has
no netem qdisc, so the round trip is made at the server: nbdkit's delay
filter holds every read, write, zero and extents request RTT ms before it
answers (the output says so). That is a per-request service time, not wire
latency: bytes in flight do not queue on a link of finite rate, so the table
shows the cost of a round trip per request, nothing about bandwidth-delay.
nbdkit gets as many threads per connection as the deepest point asks for
(its default of 16 would cap the 64 row).

The source is SIZE of random data (untracked, /dev/shm); each point copies
all of it. `blockmirror sync --workers C --requests R --json` is timed by
the sync's own `elapsed` (the copy, no interpreter start-up) and by the
whole command; `nbdcopy --flush --connections C --threads C --requests R`
by its whole run (its start-up is milliseconds). Both flush at the end.
With --from-export the direction turns: the export serves the source
read-only and both tools copy it into a new file in /dev/shm (blockmirror
reads only what block status calls data; here that is all of it).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from remote_nbd import MiB, blockmirror_sync, make_source, wait_listening

from blockmirror.units import format_bytes, size_argument

PORT = 10809


def _nbdcopy(src: Path | str, dst: Path | str, connections: int, requests: int) -> float:
    started = time.perf_counter()
    subprocess.run(["nbdcopy", "--flush", f"--connections={connections}",
                    f"--threads={connections}", f"--requests={requests}", str(src), str(dst)],
                   check=True)
    return time.perf_counter() - started


def _serve(stack: ExitStack, link: object, file: Path, rtt_ms: float, threads: int,
           readonly: bool) -> str:
    """nbdkit file in LINK's namespace; requests held RTT_MS at the server
    unless netem already delays the link."""
    ip = link.remote_ip  # type: ignore[attr-defined]
    delay = f"{rtt_ms}ms"
    plugin = ["file", f"file={file}"]
    if not link.shaped:  # type: ignore[attr-defined]
        plugin = ["--filter=delay", *plugin, f"delay-read={delay}", f"delay-write={delay}",
                  f"delay-zero={delay}", f"delay-extents={delay}"]
    print(f"# rtt {rtt_ms:g} ms made by " + ("netem on the veth pair" if link.shaped  # type: ignore[attr-defined]
          else "nbdkit's delay filter at the server (no netem here)"), flush=True)
    argv = ["ip", "netns", "exec", link.netns,  # type: ignore[attr-defined]
            "nbdkit", "--foreground", "-i", ip, "-p", str(PORT), "-t", str(threads),
            *(["-r"] if readonly else []), *plugin]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stack.callback(lambda: (proc.terminate(), proc.wait()))
    uri = f"nbd://{ip}:{PORT}/"
    wait_listening(proc, uri)
    return uri


def _point(src: Path, uri: str, args: argparse.Namespace, requests: int) -> dict[str, float]:
    """Medians over the rounds, the tools' order alternating. With
    --from-export the export (serving SRC) is copied into a new file."""
    inside, command, theirs = [], [], []
    copy = src.with_name("copy.img")
    a, b = (uri, copy) if args.from_export else (src, uri)
    for r in range(args.rounds):
        for tool in (("bm", "nbdcopy") if r % 2 == 0 else ("nbdcopy", "bm")):
            if args.from_export:
                copy.unlink(missing_ok=True)
                copy.touch()  # nbdcopy writes into a file that exists
            if tool == "bm":
                wall, elapsed = blockmirror_sync(a, b, args.connections,
                                                 ["--requests", str(requests), "--force"]
                                                 if args.from_export else
                                                 ["--requests", str(requests)])
                command.append(wall)
                inside.append(elapsed)
            else:
                theirs.append(_nbdcopy(a, b, args.connections, requests))
    return {"sync": statistics.median(inside), "command": statistics.median(command),
            "nbdcopy": statistics.median(theirs)}


def _header(args: argparse.Namespace) -> None:
    way = "from (read-only)" if args.from_export else "into"
    print(f"# {format_bytes(args.size)} of random data {way} nbdkit file in a network "
          f"namespace, {args.connections} connections (multi-conn), 256 KiB requests, "
          f"{args.rounds} rounds, medians")
    print("# round trip = nbdkit delay filter at the SERVER (delay-read/write/zero/extents), "
          "not netem: this kernel has no netem qdisc")
    print("# MiB/s of the source's bytes; ratio = blockmirror sync / nbdcopy throughput "
          "(> 1: blockmirror faster); 'cmd' is the whole blockmirror command")
    print("| rtt ms | requests | blockmirror sync MiB/s | blockmirror cmd MiB/s | "
          "nbdcopy MiB/s | ratio sync | ratio cmd |")
    print("|---|---|---|---|---|---|---|")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--size", type=size_argument, default=256 * MiB)
    parser.add_argument("--requests", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--rtt", type=float, nargs="+", default=[0.2, 1.0, 5.0],
                        help="round trips in ms (server-side delay per request)")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--from-export", action="store_true",
                        help="the other direction: `blockmirror sync nbd://... FILE` (the "
                        "export serves the source, read-only) against `nbdcopy nbd://... FILE`")
    args = parser.parse_args(argv)
    for tool in ("nbdcopy", "nbdinfo", "nbdkit", "ip"):
        if shutil.which(tool) is None:
            print(f"needs {tool}", file=sys.stderr)
            return 2
    from netnstools import can_make_hosts, two_hosts

    reason = can_make_hosts()
    if reason:
        print(reason, file=sys.stderr)
        return 2
    folder = Path(tempfile.mkdtemp(prefix="bm-inflight-", dir="/dev/shm"))
    try:
        src = folder / "src.img"
        make_source(src, args.size, args.size)
        export = folder / "export.img"
        with open(export, "wb") as f:
            f.truncate(args.size)
        _header(args)
        for rtt in args.rtt:
            with ExitStack() as stack:
                link = stack.enter_context(two_hosts(delay_ms=rtt / 2))
                uri = _serve(stack, link, src if args.from_export else export, rtt,
                             max(16, max(args.requests)), args.from_export)
                for requests in args.requests:
                    m = _point(src, uri, args, requests)
                    mib = args.size / MiB
                    print(f"| {rtt:g} | {requests} | {mib / m['sync']:.0f} | "
                          f"{mib / m['command']:.0f} | {mib / m['nbdcopy']:.0f} | "
                          f"{m['nbdcopy'] / m['sync']:.2f} | {m['nbdcopy'] / m['command']:.2f} |",
                          flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
