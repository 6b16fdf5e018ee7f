# cython: language_level=3
"""The growable C byte buffer the audit twins write into (inline: no module of its own to build)."""

from cpython.mem cimport PyMem_Realloc


cdef inline int grow_buffer(char **buf, Py_ssize_t *cap, Py_ssize_t need, Py_ssize_t first) except -1:
    """Make *buf hold at least `need` bytes: doubled from *cap (or `first`), kept as it was if
    the memory cannot be had (MemoryError)."""
    cdef Py_ssize_t size = cap[0] * 2 if cap[0] else first
    cdef char *p
    while size < need:
        size *= 2
    p = <char *>PyMem_Realloc(buf[0], size)
    if p == NULL:
        raise MemoryError()
    buf[0], cap[0] = p, size
    return 0
