"""The engine process's memory policy (:mod:`fmsam.allocator`): memory freed is reused, so a block
allocated again costs no new page faults; only ``fmsam register`` and the engine process apply it.
The fault counts run in processes of their own (the policy holds for the rest of a process)."""
import os
import resource
import subprocess
import sys

import pytest

from fmsam import allocator, cli, worker

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BLOCK = 64 * 2 ** 20

# Allocates BLOCK bytes with C's malloc, writes every page, frees it, then does the same again and
# prints the page faults of the second round (a block that size is served by mmap unless the policy holds).
SECOND_ROUND_FAULTS = r"""
import ctypes, resource, sys
if sys.argv[1] == "keep":
    from fmsam.allocator import keep_freed_memory
    assert keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = int(sys.argv[2])
for round in range(2):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def second_round_faults(policy):
    environment = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "Logic"))
    done = subprocess.run([sys.executable, "-c", SECOND_ROUND_FAULTS, policy, str(BLOCK)], capture_output=True,
                          text=True, check=True, env=environment)
    return int(done.stdout)


def _huge_pages_always():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as handle:
            return "[always]" in handle.read()
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or allocator.user_tuned_malloc() or _huge_pages_always(),
                    reason="glibc's default malloc with 4 KB-style page faults only (no MALLOC_* or "
                           "GLIBC_TUNABLES settings, transparent huge pages not 'always')")
def test_freed_memory_is_reused_without_new_page_faults():
    pages = BLOCK // resource.getpagesize()
    default = second_round_faults("default")
    if default <= pages // 2:
        pytest.skip("this C library reuses freed blocks of this size by default (%d faults)" % default)
    assert second_round_faults("keep") < pages // 50   # the same heap memory, already mapped: 0 here


def test_user_settings_of_malloc_are_left_alone():
    assert allocator.user_tuned_malloc({"MALLOC_ARENA_MAX": "2", "PATH": "/bin"})
    assert allocator.user_tuned_malloc({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
    assert not allocator.user_tuned_malloc({"PATH": "/bin", "PYTHONMALLOC": "malloc"})


def test_only_register_and_the_engine_process_apply_the_policy(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(True) or True)

    def leave(code):
        raise SystemExit(code)

    monkeypatch.setattr(os, "_exit", leave)
    for argv, applied in ((["register", "missing-fixed.nii.gz", "missing-moving.nii.gz", "--out", str(tmp_path / "o")], 1),
                          (["evaluate", "--pairs", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "e.csv")], 0)):
        calls.clear()
        with pytest.raises(SystemExit) as left:
            cli.run_and_exit(argv)
        assert left.value.code == 2 and len(calls) == applied  # bad input either way
    calls.clear()
    with pytest.raises(SystemExit) as left:
        worker.main([str(tmp_path / "missing-request.json")])
    assert left.value.code == worker.BAD_INPUT and len(calls) == 1
