"""The NBD front end: ``blockmirror serve`` runs nbdkit with blockmirror's
plugin so any NBD client (QEMU, fio, qemu-io, nbdfuse and what sits on it)
writes the image through the tracked write path.

plugin.py finds the programs and the built plugin, endpoint.py is where the
export listens, fuse.py the optional plain-file view, daemon.py detaching and
the pidfile, serve.py the supervisor that ties them together.
"""
