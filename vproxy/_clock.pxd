# cython: language_level=3
"""The C clocks the compiled twins read (inline: no module of its own to build or import)."""

from posix.time cimport CLOCK_MONOTONIC, CLOCK_REALTIME, clock_gettime, timespec


cdef inline double now_monotonic() noexcept nogil:
    """time.monotonic(), as CPython computes it on Linux."""
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef inline double now_wall() noexcept nogil:
    """time.time(), as CPython computes it on Linux."""
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9
