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
PROBE = """
import ctypes, resource, sys
from t5x_like import host_memory
kept = host_memory.keep_freed_memory()
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


def _probe(**env: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         check=True, env={**os.environ, **env}).stdout.split()
    return out[0] == "True", int(out[1])


def test_freed_memory_is_reused_without_page_faults():
    kept, faults = _probe(**{host_memory.OPT_OUT_ENV: ""})
    assert kept and faults < 100  # 64 MiB is 16384 pages of 4 KiB


def test_opting_out_leaves_glibc_to_map_large_blocks_afresh():
    kept, faults = _probe(**{host_memory.OPT_OUT_ENV: "1"})
    assert not kept and faults > 8000

