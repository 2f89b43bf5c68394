"""``t5x_like.host_memory``: the ``t5x-like`` command re-executes itself with glibc's huge-page
tunable, and under it a large block freed and allocated again faults in 2 MiB at a time."""

import os
import subprocess
import sys

import pytest

from t5x_like import host_memory

HAS_HUGE_PAGES = host_memory.huge_page_environment({}) is not None

# Re-executes like the command, then allocates and touches 64 MiB, frees it, and counts the
# page faults of doing it again (glibc maps a block that large afresh each time).
PROBE = """
import ctypes, os, resource
from t5x_like import host_memory
host_memory.reexec_with_huge_pages()
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
print(os.environ.get("GLIBC_TUNABLES", ""), faults() - before)
"""


def _probe(**env: str) -> tuple[str, int]:
    env = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         check=True, env=env).stdout.split()
    return (out[0], int(out[1])) if len(out) == 2 else ("", int(out[0]))


def test_environment_adds_the_tunable_once_and_respects_the_opt_out():
    if not HAS_HUGE_PAGES:
        pytest.skip("needs glibc >= 2.35 on Linux with transparent huge pages")
    assert host_memory.huge_page_environment({})["GLIBC_TUNABLES"] == host_memory.TUNABLE
    theirs = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "OTHER": "kept"}
    assert host_memory.huge_page_environment(theirs) == {
        "GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{host_memory.TUNABLE}", "OTHER": "kept"}
    assert host_memory.huge_page_environment({"GLIBC_TUNABLES": host_memory.TUNABLE}) is None
    assert host_memory.huge_page_environment({host_memory.OPT_OUT_ENV: "1"}) is None


@pytest.mark.skipif(not HAS_HUGE_PAGES, reason="needs glibc >= 2.35 with transparent huge pages")
def test_reexecuted_process_faults_large_blocks_in_huge_pages():
    tunables, faults = _probe(GLIBC_TUNABLES=None, **{host_memory.OPT_OUT_ENV: ""})
    assert host_memory.TUNABLE in tunables.split(":")
    # 64 MiB is 16384 pages of 4 KiB or 32 of 2 MiB; the kernel may fall back to small pages
    # for a few (fragmented memory), never for most.
    assert faults < 2000
    tunables, faults = _probe(GLIBC_TUNABLES=None, **{host_memory.OPT_OUT_ENV: "1"})
    assert tunables == "" and faults > 8000
