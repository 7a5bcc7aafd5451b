"""Memory policy of a process that runs one registration and ends: freed memory is kept for reuse.

glibc's ``malloc`` serves blocks above its mmap threshold (128 KB at first, raised adaptively up to
32 MB) with a fresh ``mmap`` and gives them back to the system when freed. The network's pass in
fast mode allocates and frees its activations layer after layer (tens of MB each on the
80 x 100 x 100 grid, two directions in one batch), so every layer's memory was new to the process and
was zeroed page by page by the kernel again: on the sample pair the network stage took 218 000-234 000
page faults (850-900 MB). With ``mmap`` off for the process and no trimming of the heap's top, freed
blocks are reused: 134 000-144 000 faults, the network stage 1.39-1.46 -> 1.23-1.25 s on a 2-core
machine whose page faults are slow (docs/benchmarks.md, "Speed and scale"). The price: the process
keeps its peak memory until it ends (peak 0.93-0.97 GB instead of 0.89-0.94 GB for one registration;
over several registrations in one process it stays at the largest one's peak instead of falling
back in between), which is why only entry points that run one registration and end call
:func:`keep_freed_memory` (``fmsam register`` and the Slicer module's engine process,
:mod:`fmsam.worker`): never ``fmsam evaluate`` (many pairs), nor a library call inside a long-lived
program such as Slicer.
"""
import ctypes
import os
import sys

#: ``mallopt`` parameters (glibc's malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
#: Largest ``M_TRIM_THRESHOLD`` (an int): the heap's free top is never given back while running.
NEVER_TRIM = 2 ** 31 - 1


def user_tuned_malloc(environment=None):
    """True when the environment already tunes glibc's malloc (``MALLOC_*`` variables or
    ``GLIBC_TUNABLES``): the user's settings are then left as they are."""
    environment = os.environ if environment is None else environment
    return any(name.startswith("MALLOC_") or name == "GLIBC_TUNABLES" for name in environment)


def keep_freed_memory():
    """Make glibc's ``malloc`` serve every block from its heap and keep freed memory there (no
    ``mmap``, no trimming) for the rest of the process. Returns True when applied; False where the
    C library is not glibc (macOS, Windows, musl), which keep their own policies, or where the user
    tuned malloc through the environment (:func:`user_tuned_malloc`)."""
    if not sys.platform.startswith("linux") or user_tuned_malloc():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success, 0 on error; trimming first, so that a partial failure leaves
    # the default mmap behaviour.
    return bool(mallopt(M_TRIM_THRESHOLD, NEVER_TRIM)) and bool(mallopt(M_MMAP_MAX, 0))
