"""The ``blockmirror`` command: the top layer, over the library's public names."""

from blockmirror.cli.main import main

__all__ = ["main"]
