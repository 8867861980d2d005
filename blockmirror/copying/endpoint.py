"""Where a sync or a verify reads or writes: a local path, or an NBD export
named by a URI (``nbd://HOST[:PORT]/[EXPORT]``, ``nbd+unix:///[EXPORT]?socket=PATH``).

:func:`parse` tells them apart and checks a URI's shape before anything
connects, so a typo is one line of bad input (exit 2). A URI may carry user
info (``nbd://user:secret@host/``): it is passed to libnbd untouched but never
shown — :attr:`NbdUri.display` leaves it out, and that is what messages and
results print.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field

from blockmirror.errors import InvalidInputError

NBD_SCHEMES = ("nbd", "nbd+unix")
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


def looks_like_uri(text: str) -> bool:
    """True for anything of the form SCHEME://...: a path that looks like a
    URI is refused rather than created as a folder named 'nbd:'."""
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.replace("+", "").isalnum()


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


def parse(text: str) -> str | NbdUri:
    """TEXT as a local path (returned as it is) or an NbdUri, checked.
    Raises InvalidInputError for a URI this build cannot use."""
    if not looks_like_uri(text):
        return text
    parts = urllib.parse.urlsplit(text)
    scheme = parts.scheme.lower()
    shown = _without_user_info(parts)
    if scheme in LATER_SCHEMES:
        raise InvalidInputError(f"{shown}: {scheme}:// is not supported yet (nbd://, nbd+unix://)")
    if scheme not in NBD_SCHEMES:
        raise InvalidInputError(f"{shown}: unknown URI scheme {scheme!r} (nbd://, nbd+unix://)")
    if parts.fragment:
        raise InvalidInputError(f"{shown}: an NBD URI has no #fragment")
    (_check_unix if scheme == "nbd+unix" else _check_tcp)(parts, shown)
    return NbdUri(text, shown)


def is_remote(text: str) -> bool:
    """Whether TEXT names an NBD export (checked as by :func:`parse`)."""
    return isinstance(parse(text), NbdUri)
