"""What looks like a URI (``SCHEME://...``), apart from the parsers in
``endpoint``: a local sync and verify ask only this, and should not pay for
urllib.parse and the endpoint classes (~2 ms of every start)."""

from __future__ import annotations


def looks_like_uri(text: str) -> bool:
    """True for anything of the form SCHEME://...: a path that looks like a
    URI is refused rather than created as a folder named 'nbd:'."""
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.replace("+", "").isalnum()
