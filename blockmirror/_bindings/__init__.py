"""The private bindings of the C core, one module per C area.

The only importers of ``blockmirror._core`` (and ``blockmirror._fastwrite``):
``_ffi`` (errors and scans shared by all), ``tracker`` (cbt.c, bitmap.c,
control.c), ``writer`` (writer.c and its CPython fast path), ``copy``
(copy.c) and ``compare`` (compare.c). Each wrapper converts its arguments,
makes one C call (cffi releases the GIL for it) and turns -1 into an
exception. Only the thin wrappers above them import these modules:
``tracking.tracker``, ``copying.copier``, ``copying.extents`` and
``copying.verify``; the orchestration and the CLI never do.
"""
