"""Memory policy of a process that runs one registration and ends: freed memory is kept for reuse.

glibc's ``malloc`` serves each block over 128 KB to 32 MB (its adaptive threshold) with a fresh
``mmap`` and gives it back to the system when freed. The network's pass in fast mode allocates and
frees its activations layer after layer (tens of MB each on the 80 x 100 x 100 grid, two
directions in one batch), so every layer's memory is new to the process and is zeroed page by page by
the kernel again: on the sample pair the network stage took about 218 000 page faults (900 MB). With
``mmap`` off for the process and no trimming of the heap's top, freed blocks are reused: 141 000
faults, the network stage 1.46 -> 1.25 s and writing the outputs 0.54 -> 0.49 s on a 2-core machine
whose page faults are slow (docs/benchmarks.md, "Speed"). The peak memory is about the same
(939 -> 963 MB); the memory is returned when the process ends, which is why only whole-process entry
points call :func:`keep_freed_memory` (the ``fmsam`` command and the Slicer module's engine process,
:mod:`fmsam.worker`), never a library call inside a long-lived program such as Slicer.
"""
import ctypes
import ctypes.util
import sys

#: ``mallopt`` parameters (glibc's malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
#: Largest ``M_TRIM_THRESHOLD`` (an int): the heap's free top is never given back while running.
NEVER_TRIM = 2 ** 31 - 1


def keep_freed_memory():
    """Make glibc's ``malloc`` serve every block from its heap and keep freed memory there (no
    ``mmap``, no trimming) for the rest of the process. Returns True when applied; False where the
    C library is not glibc (macOS, Windows, musl), which keep their own policies."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success, 0 on error; set trimming first so that a partial failure
    # leaves the default mmap behaviour.
    return bool(mallopt(M_TRIM_THRESHOLD, NEVER_TRIM)) and bool(mallopt(M_MMAP_MAX, 0))
