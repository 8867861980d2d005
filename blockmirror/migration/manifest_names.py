"""How a digest manifest is named and recognised, apart from the manifest
itself: the pre-check of every command needs these, and ``manifest`` loads
numpy and xxhash, which ``track status`` and ``verify`` should not pay."""

MAGIC_PREFIX = b"BMMANIFEST "
SUFFIX = ".bm-manifest"
TMP_SUFFIX = ".tmp"  # a new manifest's name until commit (see Manifest.discard)
