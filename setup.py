# Metadata lives in pyproject.toml; this file only wires the C builds.
import os
from pathlib import Path

from setuptools import Extension, setup

CORE_SOURCES = sorted(str(p) for p in Path("csrc").glob("*.c"))


def _nbdkit_headers() -> bool:
    """nbdkit's plugin header (Debian nbdkit-plugin-dev). Without it the
    front end is not built and `blockmirror serve` says what to install;
    BLOCKMIRROR_NO_NBDKIT=1 builds without it on purpose (tests of that)."""
    if os.environ.get("BLOCKMIRROR_NO_NBDKIT") == "1":
        return False
    return any(os.path.exists(os.path.join(d, "nbdkit-plugin.h"))
               for d in ("/usr/include", "/usr/local/include"))


extensions = [
    # One function outside cffi: TrackedImage.pwrite's hot path. A cffi call
    # alone costs more than the 10 % a 4 KiB write may add to os.pwrite
    # (issue 2, bench/README.md). It links no core sources: it calls bm_pwrite
    # through a pointer taken from blockmirror._core (csrc/python/fastwrite.c).
    Extension(
        "blockmirror._fastwrite",
        ["csrc/python/fastwrite.c"],
        include_dirs=["csrc"],
        depends=["csrc/blockmirror.h"],
        extra_compile_args=["-std=gnu11", "-O2", "-Wall", "-Wextra"],
    )
]
if _nbdkit_headers():
    # The NBD front end: a shared object nbdkit loads (not a Python module;
    # built as an Extension only so pip puts it in the package). It carries
    # its own copy of the core, so nbdkit's writes take the very C path
    # TrackedImage's do; hidden visibility keeps all but plugin_init private.
    extensions.append(Extension(
        "blockmirror._nbdkit_plugin",
        ["csrc/nbdkit/plugin.c", *CORE_SOURCES],
        include_dirs=["csrc"],
        depends=["csrc/blockmirror.h", "csrc/bm_internal.h"],
        extra_compile_args=["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
                            "-fvisibility=hidden"],
    ))

def _libnbd_headers() -> bool:
    """libnbd's header (Debian libnbd-dev): without it blockmirror._remote
    (nbd:// endpoints) is not built and such a URI says what to install;
    BLOCKMIRROR_NO_LIBNBD=1 builds without it on purpose."""
    if os.environ.get("BLOCKMIRROR_NO_LIBNBD") == "1":
        return False
    return any(os.path.exists(os.path.join(d, "libnbd.h"))
               for d in ("/usr/include", "/usr/local/include"))


def _libnfs_headers() -> bool:
    """libnfs's header (Debian libnfs-dev): without it blockmirror._nfs
    (nfs:// endpoints) is not built; BLOCKMIRROR_NO_LIBNFS=1 skips it."""
    if os.environ.get("BLOCKMIRROR_NO_LIBNFS") == "1":
        return False
    return any(os.path.exists(os.path.join(d, "nfsc", "libnfs.h"))
               for d in ("/usr/include", "/usr/local/include"))


cffi_modules = ["csrc/build_ffi.py:ffibuilder"]
if _libnbd_headers():
    cffi_modules.append("csrc/remote/build_ffi.py:ffibuilder")
if _libnfs_headers():
    cffi_modules.append("csrc/nfs/build_ffi.py:ffibuilder")

setup(
    cffi_modules=cffi_modules,
    ext_modules=extensions,
)
