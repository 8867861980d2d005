/* fastwrite.c - blockmirror._fastwrite: the hot path of TrackedImage.pwrite
 * as a CPython extension type, and nothing else.
 *
 * Why this one call is not cffi: a 4 KiB write into the page cache takes
 * ~1.4 us and issue 2 allows a tracked write 10 % more than os.pwrite. The C
 * tracking fits (bm_pwrite costs 1.02x pwrite(2), bench/c_pwrite_floor.c);
 * a cffi call from Python alone costs ~116 ns plus a larger cache footprint,
 * and the Python frame around it another ~0.1x (bench/README.md). A
 * vectorcall type is called like os.pwrite: no frame, no argument tuple.
 * Every other call stays in cffi (csrc/build_ffi.py, blockmirror/_binding.py).
 *
 * One copy of the C core: this module links none of the core's sources. It calls
 * bm_pwrite and bm_last_error through function pointers that _binding.py
 * takes from the cffi module (ffi.addressof(lib, ...)). Linking the sources
 * a second time would give a second tracker implementation, built with other
 * flags, with its own thread-local last error, operating on handles the other
 * copy created. Only the prototypes come from blockmirror.h (below), so the
 * pointer types cannot drift from the C.
 *
 * A Writer is bound to one open tracker handle and fd:
 *
 *     Writer(bm_pwrite_addr, bm_last_error_addr, handle_addr, handle, fd,
 *            path, on_stale)(data, offset) -> int
 *
 * DATA is anything with a contiguous buffer (bytes, bytearray, memoryview);
 * the GIL is released around bm_pwrite, which may wait out a freeze (I3).
 * On failure: ESTALE (the image was moved) returns on_stale(data, offset)
 * when ON_STALE is not None; any other errno raises OSError(errno,
 * bm_last_error(), path), so callers get FileNotFoundError, ENOSPC... as
 * from the cffi path (except that EUCLEAN - the sidecar was truncated under
 * the writer, guard.c - is a plain OSError here where the cffi path raises
 * its SidecarCorruptError subclass).
 * HANDLE (the cffi object owning HANDLE_ADDR) is kept alive by the Writer,
 * and close() detaches it: later calls raise ValueError instead of touching
 * a freed tracker, even through a reference taken before the image closed.
 *
 * A type rather than functools.partial over a METH_FASTCALL function: the
 * partial would bind four arguments, and with the call's two that is more
 * than partial's five-slot stack, so every write would malloc its argument
 * array (partial's forwarding cost ~15 ns a call in a probe); the type also
 * carries close() and keeps HANDLE alive.
 *
 * Not thread-safe against close(): closing the image while another thread
 * is inside a write frees the tracker under it, on this path as on cffi's.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* The C core's public header (also the cffi cdef; it has no #include of its
 * own). Used for the prototypes only: nothing here links against them. */
#include "blockmirror.h"

typedef __typeof__(bm_pwrite) *bm_pwrite_fn;
typedef __typeof__(bm_last_error) *bm_last_error_fn;

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    bm_pwrite_fn pwrite;
    bm_last_error_fn last_error;
    bm_tracker *tracker;        /* NULL once closed */
    int fd;
    PyObject *handle;           /* owns TRACKER (a cffi ffi.gc object) */
    PyObject *path;             /* OSError.filename */
    PyObject *on_stale;         /* callable or None */
} Writer;

static PyObject *writer_call(PyObject *callable, PyObject *const *args, size_t nargsf,
                             PyObject *kwnames)
{
    Writer *self = (Writer *)callable;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs != 2 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames) != 0)) {
        PyErr_Format(PyExc_TypeError, "pwrite(data, offset) takes 2 positional arguments");
        return NULL;
    }
    if (self->tracker == NULL) {
        PyErr_SetString(PyExc_ValueError, "image is closed");
        return NULL;
    }
    PyObject *data = args[0], *offset_obj = args[1];

    /* The offset first, as the cffi path converts it: int or __index__,
     * OverflowError when negative or past 2**64. */
    unsigned long long offset;
    if (PyLong_CheckExact(offset_obj)) {
        offset = PyLong_AsUnsignedLongLong(offset_obj);
    } else {
        PyObject *index = PyNumber_Index(offset_obj);
        if (index == NULL)
            return NULL;
        offset = PyLong_AsUnsignedLongLong(index);
        Py_DECREF(index);
    }
    if (offset == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;

    /* The export pins the buffer: a bytearray cannot be resized (or freed)
     * while the write runs without the GIL. */
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0)
        return NULL;

    bm_pwrite_fn pwrite = self->pwrite;
    bm_tracker *tracker = self->tracker;
    int fd = self->fd;
    int64_t n;
    int err = 0;
    const char *reason = NULL;
    Py_BEGIN_ALLOW_THREADS
    n = pwrite(tracker, fd, (const char *)view.buf, (uint64_t)view.len, (uint64_t)offset);
    if (n < 0) {
        err = errno;
        reason = self->last_error();    /* this thread's, so read it here */
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);

    if (n >= 0)
        return PyLong_FromLongLong((long long)n);
    if (err == ESTALE && self->on_stale != Py_None) {
        /* SELF may be closed and even freed while the handler runs (the
         * redirect rebinds the image's pwrite): nothing below touches it. */
        PyObject *on_stale = self->on_stale;
        Py_INCREF(on_stale);
        PyObject *result = PyObject_Vectorcall(on_stale, args, 2, NULL);
        Py_DECREF(on_stale);
        return result;
    }
    PyObject *message = PyUnicode_DecodeUTF8(reason, (Py_ssize_t)strlen(reason), "replace");
    if (message == NULL)
        return NULL;
    PyObject *exc = PyObject_CallFunction(PyExc_OSError, "iOO", err, message, self->path);
    Py_DECREF(message);
    if (exc != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
    return NULL;
}

static int writer_traverse(Writer *self, visitproc visit, void *arg)
{
    Py_VISIT(self->handle);
    Py_VISIT(self->path);
    Py_VISIT(self->on_stale);
    return 0;
}

static int writer_clear(Writer *self)
{
    self->tracker = NULL;
    Py_CLEAR(self->handle);
    Py_CLEAR(self->path);
    Py_CLEAR(self->on_stale);
    return 0;
}

static void writer_dealloc(Writer *self)
{
    PyObject_GC_UnTrack(self);
    writer_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *writer_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"bm_pwrite", "bm_last_error", "handle_addr", "handle", "fd",
                             "path", "on_stale", NULL};
    unsigned long long pwrite_addr, last_error_addr, handle_addr;
    PyObject *handle, *path, *on_stale;
    int fd;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "KKKOiOO:Writer", kwlist, &pwrite_addr,
                                     &last_error_addr, &handle_addr, &handle, &fd, &path,
                                     &on_stale))
        return NULL;
    if (pwrite_addr == 0 || last_error_addr == 0 || handle_addr == 0) {
        PyErr_SetString(PyExc_ValueError, "null function or handle address");
        return NULL;
    }
    if (on_stale != Py_None && !PyCallable_Check(on_stale)) {
        PyErr_SetString(PyExc_TypeError, "on_stale must be callable or None");
        return NULL;
    }
    Writer *self = (Writer *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->vectorcall = writer_call;
    self->pwrite = (bm_pwrite_fn)(uintptr_t)pwrite_addr;
    self->last_error = (bm_last_error_fn)(uintptr_t)last_error_addr;
    self->tracker = (bm_tracker *)(uintptr_t)handle_addr;
    self->fd = fd;
    Py_INCREF(handle);
    self->handle = handle;
    Py_INCREF(path);
    self->path = path;
    Py_INCREF(on_stale);
    self->on_stale = on_stale;
    return (PyObject *)self;
}

static PyObject *writer_close(Writer *self, PyObject *unused)
{
    (void)unused;
    self->tracker = NULL;
    Py_CLEAR(self->handle);
    Py_RETURN_NONE;
}

static PyObject *writer_get_closed(Writer *self, void *unused)
{
    (void)unused;
    return PyBool_FromLong(self->tracker == NULL);
}

static PyMethodDef writer_methods[] = {
    {"close", (PyCFunction)writer_close, METH_NOARGS,
     "Detach from the tracker: later calls raise ValueError. Call before the "
     "tracker is closed."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef writer_getset[] = {
    {"closed", (getter)writer_get_closed, NULL, "True once close() was called.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject WriterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "blockmirror._fastwrite.Writer",
    .tp_doc = "pwrite(data, offset) -> int: one tracked write (bm_pwrite) on one image.",
    .tp_basicsize = sizeof(Writer),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(Writer, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_new = writer_new,
    .tp_dealloc = (destructor)writer_dealloc,
    .tp_traverse = (traverseproc)writer_traverse,
    .tp_clear = (inquiry)writer_clear,
    .tp_methods = writer_methods,
    .tp_getset = writer_getset,
};

static struct PyModuleDef fastwrite_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "blockmirror._fastwrite",
    .m_doc = "TrackedImage.pwrite's hot path: bm_pwrite called without cffi.",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__fastwrite(void)
{
    if (PyType_Ready(&WriterType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&fastwrite_module);
    if (module == NULL)
        return NULL;
    Py_INCREF(&WriterType);
    if (PyModule_AddObject(module, "Writer", (PyObject *)&WriterType) < 0) {
        Py_DECREF(&WriterType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
