"""Where a sync or a verify reads or writes: a local path, an NBD export
named by a URI (``nbd://HOST[:PORT]/[EXPORT]``, ``nbd+unix:///[EXPORT]?socket=PATH``),
or a file on an NFS server (``nfs://SERVER/EXPORT/FILE[?ARGS]``, libnfs's syntax).

:func:`parse` tells them apart and checks a URI's shape before anything
connects, so a typo is one line of bad input (exit 2). A URI may carry user
info (``nbd://user:secret@host/``): it is passed to libnbd untouched but never
shown — :attr:`NbdUri.display` leaves it out, and that is what messages and
results print.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field

from blockmirror.copying.uri_names import looks_like_uri as looks_like_uri
from blockmirror.errors import InvalidInputError

NBD_SCHEMES = ("nbd", "nbd+unix")
NFS_SCHEME = "nfs"
# libnfs URL arguments an nfs:// URI may carry (the rest are refused, not guessed at).
NFS_ARGUMENTS = ("version", "nfsport", "mountport", "uid", "gid", "tcp-syncnt")
# Schemes libnbd knows that this slice does not take yet.
LATER_SCHEMES = ("nbds", "nbds+unix", "nbd+vsock", "nbds+vsock")


@dataclass(frozen=True)
class NbdUri:
    """An NBD export. ``uri`` is what libnbd gets (user info included);
    ``display`` is the same without user info, for messages and JSON."""

    uri: str = field(repr=False)
    display: str

    def __str__(self) -> str:
        return self.display


@dataclass(frozen=True)
class NfsUrl:
    """A file on an NFS server. ``url`` is what libnfs gets; ``display`` the
    same for messages and JSON; the export is the path up to the last slash
    (as libnfs and QEMU split it), ``file`` the name after it."""

    url: str = field(repr=False)
    display: str
    export: str
    file: str

    def __str__(self) -> str:
        return self.display


def _without_user_info(parts: urllib.parse.SplitResult) -> str:
    host = parts.netloc.rpartition("@")[2]
    query = f"?{parts.query}" if parts.query else ""
    return f"{parts.scheme}://{host}{parts.path}{query}"


def _check_tcp(parts: urllib.parse.SplitResult, shown: str) -> None:
    if not parts.hostname:
        raise InvalidInputError(f"{shown}: an nbd:// URI needs a host (nbd://HOST[:PORT]/)")
    try:
        port = parts.port
    except ValueError:
        raise InvalidInputError(f"{shown}: the port is not a number from 1 to 65535") from None
    if port == 0:
        raise InvalidInputError(f"{shown}: the port is not a number from 1 to 65535")
    if parts.query:
        raise InvalidInputError(f"{shown}: nbd:// takes no query (?socket= is for nbd+unix://)")


def _check_unix(parts: urllib.parse.SplitResult, shown: str) -> None:
    if parts.netloc.rpartition("@")[2]:
        raise InvalidInputError(f"{shown}: nbd+unix:// has no host (nbd+unix:///?socket=PATH)")
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    sockets = query.get("socket", [])
    if len(sockets) != 1 or not sockets[0]:
        raise InvalidInputError(f"{shown}: nbd+unix:// needs one ?socket=PATH")
    unknown = sorted(set(query) - {"socket"})
    if unknown:
        raise InvalidInputError(f"{shown}: unsupported URI parameter {unknown[0]!r}")


def parse(text: str) -> str | NbdUri | NfsUrl:
    """TEXT as a local path (returned as it is), an NbdUri or an NfsUrl, checked.
    Raises InvalidInputError for a URI this build cannot use."""
    if not looks_like_uri(text):
        return text
    parts = urllib.parse.urlsplit(text)
    scheme = parts.scheme.lower()
    shown = _without_user_info(parts)
    if scheme in LATER_SCHEMES:
        raise InvalidInputError(f"{shown}: {scheme}:// is not supported yet (nbd://, nbd+unix://)")
    if scheme == NFS_SCHEME:
        return _parse_nfs(text, parts, shown)
    if scheme not in NBD_SCHEMES:
        raise InvalidInputError(f"{shown}: unknown URI scheme {scheme!r} "
                                "(nbd://, nbd+unix://, nfs://)")
    if parts.fragment:
        raise InvalidInputError(f"{shown}: an NBD URI has no #fragment")
    (_check_unix if scheme == "nbd+unix" else _check_tcp)(parts, shown)
    return NbdUri(text, shown)


def _check_nfs_query(query: str, shown: str) -> None:
    args = urllib.parse.parse_qs(query, keep_blank_values=True)
    unknown = sorted(set(args) - set(NFS_ARGUMENTS))
    if unknown:
        raise InvalidInputError(f"{shown}: unsupported nfs:// URI parameter {unknown[0]!r} "
                                f"(takes {', '.join(NFS_ARGUMENTS)})")
    for name, values in args.items():
        if len(values) != 1 or not values[0].isdigit():
            raise InvalidInputError(f"{shown}: ?{name}= takes one number")
    if args.get("version", ["3"])[0] != "3":
        # libnfs 4.0 (Debian 12) fails every NFSv4 WRITE over 4 KiB.
        raise InvalidInputError(f"{shown}: only NFSv3 is supported (libnfs 4.0's NFSv4 "
                                "writes fail past 4 KiB); drop ?version=")
    for name in ("nfsport", "mountport"):
        if name in args and not 0 < int(args[name][0]) < 65536:
            raise InvalidInputError(f"{shown}: ?{name}= is not a port from 1 to 65535")


def _parse_nfs(text: str, parts: urllib.parse.SplitResult, shown: str) -> NfsUrl:
    """nfs://SERVER/EXPORT/FILE[?ARGS]: no user info (libnfs takes none, and
    a secret must not end up in a message), no port in the host part (libnfs
    4.0 takes ?nfsport= and ?mountport= instead), a file name after the
    export."""
    if "@" in parts.netloc:
        raise InvalidInputError(f"{shown}: an nfs:// URI takes no user info (uid= and gid= "
                                "set the credentials)")
    if not parts.hostname:
        raise InvalidInputError(f"{shown}: an nfs:// URI needs a server "
                                "(nfs://SERVER/EXPORT/FILE)")
    try:
        port = parts.port
    except ValueError:
        port = -1
    if port is not None:
        raise InvalidInputError(f"{shown}: give the NFS port as ?nfsport=PORT (and "
                                "?mountport=PORT), not SERVER:PORT")
    if parts.fragment:
        raise InvalidInputError(f"{shown}: an nfs:// URI has no #fragment")
    export, _, name = parts.path.rpartition("/")
    if not parts.path.startswith("/") or not name or name in (".", ".."):
        raise InvalidInputError(f"{shown}: an nfs:// URI names a file: "
                                "nfs://SERVER/EXPORT/FILE")
    _check_nfs_query(parts.query, shown)
    return NfsUrl(text, shown, export or "/", name)


def is_remote(text: str) -> bool:
    """Whether TEXT names an NBD export or an NFS file (checked as by :func:`parse`)."""
    return isinstance(parse(text), (NbdUri, NfsUrl))
