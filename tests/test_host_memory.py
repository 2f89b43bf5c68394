"""``t5x_like.host_memory``: after ``keep_freed_memory()`` a large block freed and allocated
again is served from the process's heap instead of being mapped (and faulted in) afresh."""

import ctypes
import os
import subprocess
import sys

import pytest

from t5x_like import host_memory

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "gnu_get_libc_version"),
    reason="glibc only")

# Allocates and touches 64 MiB, frees it, then counts the page faults of doing it again.
# argv[1]: "call" calls keep_freed_memory() itself; "command" imports t5x_like as the
# t5x-like command does (sys.argv[0] == "t5x-like") and calls nothing.
PROBE = """
import ctypes, resource, sys
mode = sys.argv[1]
sys.argv[0] = "t5x-like" if mode == "command" else sys.argv[0]
import t5x_like
from t5x_like import host_memory
kept = host_memory.keep_freed_memory() if mode == "call" else None
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
size = 64 << 20
def touch():
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    return block
libc.free(ctypes.c_void_p(touch()))
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
before = faults()
touch()
print(kept, faults() - before)
"""


def _probe(mode: str, **env: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True, env={**os.environ, **env}).stdout.split()
    return out[0], int(out[1])


def test_freed_memory_is_reused_without_page_faults():
    kept, faults = _probe("call")
    assert kept == "True" and faults < 100  # 64 MiB is 16384 pages of 4 KiB


def test_the_command_leaves_glibc_as_it_is_unless_asked():
    # Default: glibc maps large blocks afresh (the memory goes back to the system).
    assert _probe("command", **{host_memory.OPT_IN_ENV: ""})[1] > 8000
    assert _probe("command", **{host_memory.OPT_IN_ENV: "0"})[1] > 8000
    assert _probe("command", **{host_memory.OPT_IN_ENV: "1"})[1] < 100
