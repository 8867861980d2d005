"""Where the export listens: a unix socket (the default; mode 0600, in a
private folder unless a path is given) or a TCP port (loopback unless asked).

nbdkit makes its socket under its own umask (it resets it to 022), so it
binds in a private 0700 folder; the socket is made 0600 there and only then
linked to the name clients see, so nobody can connect before it is private.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import stat
import struct
import tempfile
import urllib.parse
from typing import Any

from blockmirror.errors import InvalidInputError

# sockaddr_un.sun_path holds 108 bytes with the terminating NUL.
MAX_SOCKET_PATH = 107
_SOCKET_NAME = "nbd.sock"
_PROBE_TIMEOUT_S = 2.0
# The newstyle greeting: NBDMAGIC, IHAVEOPT, 16 bits of server flags.
_GREETING = struct.Struct(">8s8sH")
_CLIENT_FLAGS = 1 | 2  # NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES
_OPT_ABORT = 2

SocketAddress = str | tuple[Any, ...]


def speaks_nbd(family: int, address: SocketAddress) -> bool:
    """True when an NBD server answers at ADDRESS. The probe is a complete
    handshake ending in NBD_OPT_ABORT, so the server logs no error for it."""
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(_PROBE_TIMEOUT_S)
            sock.connect(address)
            greeting = b""
            while len(greeting) < _GREETING.size:
                chunk = sock.recv(_GREETING.size - len(greeting))
                if not chunk:
                    return False
                greeting += chunk
            magic, option_magic, _ = _GREETING.unpack(greeting)
            if (magic, option_magic) != (b"NBDMAGIC", b"IHAVEOPT"):
                return False
            sock.sendall(struct.pack(">I", _CLIENT_FLAGS)
                         + b"IHAVEOPT" + struct.pack(">II", _OPT_ABORT, 0))
            return True
    except OSError:
        return False


class Endpoint:
    """One place the export listens. Lifetime: check() before anything
    exists, prepare(), nbdkit started with nbdkit_args(), accepts() polled,
    publish(), and remove() in every case."""

    uri = ""

    def check(self) -> None:
        """Bad input (InvalidInputError) found before anything is created."""

    def prepare(self) -> None:
        """Create what nbdkit needs to listen."""

    def nbdkit_args(self) -> list[str]:
        raise NotImplementedError

    def accepts(self) -> bool:
        raise NotImplementedError

    def publish(self) -> None:
        """Make the listening end what clients are told (mode, final name)."""

    def remove(self) -> None:
        """Undo prepare() and publish(); idempotent."""


class UnixEndpoint(Endpoint):
    """A unix socket at PATH, or in a new private folder when PATH is None."""

    def __init__(self, path: str | None) -> None:
        self.final = None if path is None else os.path.abspath(path)
        self._private: str | None = None  # the 0700 folder nbdkit binds in
        self._bound = ""
        self._published: tuple[int, int] | None = None  # (dev, ino) linked at final

    @property
    def path(self) -> str:
        return self.final or self._bound

    @property
    def uri(self) -> str:  # type: ignore[override]
        return "nbd+unix:///?socket=" + urllib.parse.quote(self.path, safe="/")

    def check(self) -> None:
        if self.final is None:
            return
        if os.path.lexists(self.final):
            raise InvalidInputError(f"socket path {self.final} already exists")
        parent = os.path.dirname(self.final)
        if not os.path.isdir(parent):
            raise InvalidInputError(f"the folder of socket path {self.final} does not exist")
        if len(os.fsencode(self.final)) > MAX_SOCKET_PATH:
            raise InvalidInputError(f"socket path {self.final} is longer than "
                                    f"{MAX_SOCKET_PATH} bytes")

    def prepare(self) -> None:
        if self.final is None:
            self._private = tempfile.mkdtemp(prefix="blockmirror-serve-")
            self._bound = os.path.join(self._private, _SOCKET_NAME)
        else:
            # Beside the final name (link() needs the same filesystem), and
            # short: it must fit in sun_path wherever the final name does.
            self._private = tempfile.mkdtemp(prefix=".bm-", dir=os.path.dirname(self.final))
            self._bound = os.path.join(self._private, "s")
        if len(os.fsencode(self._bound)) > MAX_SOCKET_PATH:
            self.remove()
            where = "the temporary folder" if self.final is None else "the socket's folder"
            raise InvalidInputError(f"{where} has too long a path for a unix socket "
                                    f"({self._bound}); pass a shorter --socket")

    def nbdkit_args(self) -> list[str]:
        return ["-U", self._bound]

    def accepts(self) -> bool:
        return speaks_nbd(socket.AF_UNIX, self._bound)

    def publish(self) -> None:
        st = os.lstat(self._bound)
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EINVAL, "nbdkit did not create a socket", self._bound)
        os.chmod(self._bound, 0o600)
        if self.final is None:
            return
        try:
            os.link(self._bound, self.final)  # never replaces: fails if the name appeared
        except FileExistsError:
            raise InvalidInputError(f"socket path {self.final} already exists") from None
        self._published = (st.st_dev, st.st_ino)
        os.unlink(self._bound)
        os.rmdir(self._private)  # type: ignore[arg-type]
        self._private = None

    def remove(self) -> None:
        if self.final is not None and self._published is not None:
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(self.final)
                if (st.st_dev, st.st_ino) == self._published:  # still ours
                    os.unlink(self.final)
            self._published = None
        if self._private is not None:
            shutil.rmtree(self._private, ignore_errors=True)
            self._private = None


class TcpEndpoint(Endpoint):
    """A TCP port on ADDRESS (127.0.0.1 unless the operator says otherwise)."""

    def __init__(self, port: int, address: str = "127.0.0.1") -> None:
        self.port = port
        self.address = address
        self._family = socket.AF_INET
        self._sockaddr: SocketAddress = (address, port)

    @property
    def uri(self) -> str:  # type: ignore[override]
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"nbd://{host}:{self.port}"

    def check(self) -> None:
        try:
            infos = socket.getaddrinfo(self.address, self.port, type=socket.SOCK_STREAM)
        except socket.gaierror:
            raise InvalidInputError(f"bind address {self.address} is not a known host "
                                    "or address") from None
        self._family, _, _, _, self._sockaddr = infos[0]
        with socket.socket(self._family, socket.SOCK_STREAM) as probe:
            # nbdkit sets SO_REUSEADDR too: a port in TIME_WAIT is free to it.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(self._sockaddr)
            except OSError as e:
                raise InvalidInputError(self.bind_failure(e.errno)) from None

    def bind_failure(self, code: int | None) -> str:
        """The one-line problem a failed bind (errno CODE) means."""
        if code == errno.EADDRINUSE:
            return f"port {self.port} on {self.address} is in use"
        if code == errno.EADDRNOTAVAIL:
            return f"bind address {self.address} is not an address of this host"
        if code == errno.EACCES:
            return f"port {self.port} needs privileges this process lacks"
        return f"cannot listen on {self.address} port {self.port}: {os.strerror(code or 0)}"

    def nbdkit_args(self) -> list[str]:
        return ["-p", str(self.port), "-i", self.address]

    def accepts(self) -> bool:
        return speaks_nbd(self._family, self._sockaddr)
