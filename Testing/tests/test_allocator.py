"""The engine process's memory policy (:mod:`fmsam.allocator`): memory freed is reused, so a block
allocated again costs no new page faults. Each case runs in a process of its own (the policy holds
for the rest of a process)."""
import subprocess
import sys

import pytest

# Allocates 64 MB with C's malloc, writes every page, frees it, then does the same again and prints
# the page faults of the second round (a block that size is served by mmap unless the policy holds).
SECOND_ROUND_FAULTS = r"""
import ctypes, ctypes.util, resource, sys
if sys.argv[1] == "keep":
    from fmsam.allocator import keep_freed_memory
    assert keep_freed_memory()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 64 * 2 ** 20
for round in range(2):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def second_round_faults(policy):
    done = subprocess.run([sys.executable, "-c", SECOND_ROUND_FAULTS, policy], capture_output=True, text=True,
                          check=True)
    return int(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_freed_memory_is_reused_without_new_page_faults():
    pages = 64 * 2 ** 20 // 4096
    assert second_round_faults("default") > pages // 2   # a fresh mapping: every page faults again
    assert second_round_faults("keep") < pages // 50     # the same heap memory, already mapped
