"""``t5x_like.host_memory``: after ``keep_freed_memory()`` a large block freed and allocated
again is served from the process's heap instead of being mapped (and faulted in) afresh; the
``t5x-like`` command restarts itself so that glibc backs such blocks with huge pages (the
kernel's page-fault count tells)."""

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
import ctypes, os, resource, sys
print("pid", os.getpid(), flush=True)  # printed again after a restart
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
print(kept, faults() - before, os.environ.get("GLIBC_TUNABLES", "-"))
"""


def _run_probe(mode: str, **env: str) -> list[str]:
    """The probe's output lines, run without the caller's glibc tunables unless ``env`` has some."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("GLIBC_TUNABLES", host_memory.HUGE_PAGES_ENV)}
    return subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                          check=True, env={**base, **env}).stdout.splitlines()


def _probe(mode: str, **env: str) -> tuple[str, int]:
    kept, faults, _ = _run_probe(mode, **env)[-1].split()
    return kept, int(faults)


def test_freed_memory_is_reused_without_page_faults():
    kept, faults = _probe("call")
    assert kept == "True" and faults < 100  # 64 MiB is 16384 pages of 4 KiB


def test_the_command_keeps_freed_memory_only_when_asked():
    # Without huge pages, glibc maps large blocks afresh (the memory goes back to the system).
    small_pages = {host_memory.HUGE_PAGES_ENV: "0"}
    if host_memory.transparent_huge_pages_mode() != "always":
        assert _probe("command", **small_pages, **{host_memory.OPT_IN_ENV: ""})[1] > 8000
        assert _probe("command", **small_pages, **{host_memory.OPT_IN_ENV: "0"})[1] > 8000
    assert _probe("command", **small_pages, **{host_memory.OPT_IN_ENV: "1"})[1] < 100


needs_madvise_thp = pytest.mark.skipif(
    host_memory.transparent_huge_pages_mode() != "madvise"
    or host_memory.huge_pages_environment({}) is None,
    reason="transparent huge pages are not 'madvise' here, or glibc is older than 2.35")


@needs_madvise_thp
def test_the_command_restarts_itself_with_huge_pages_for_large_blocks():
    lines = _run_probe("command")
    pids = [line for line in lines if line.startswith("pid")]
    assert len(pids) == 2 and pids[0] == pids[1]  # the same process, started again
    kept, faults, tunables = lines[-1].split()
    assert tunables == host_memory.HUGE_PAGES_TUNABLE
    assert int(faults) < 4000  # 64 MiB: 16384 pages of 4 KiB, 32 of 2 MiB


@needs_madvise_thp
def test_huge_pages_can_be_turned_off_and_other_tunables_are_kept():
    lines = _run_probe("command", **{host_memory.HUGE_PAGES_ENV: "0"})
    assert len([line for line in lines if line.startswith("pid")]) == 1
    assert int(lines[-1].split()[1]) > 8000
    kept, faults, tunables = _run_probe(
        "command", GLIBC_TUNABLES="glibc.malloc.arena_max=2")[-1].split()
    assert tunables == "glibc.malloc.arena_max=2:" + host_memory.HUGE_PAGES_TUNABLE


def test_no_restart_where_it_would_change_nothing():
    tunable = {"GLIBC_TUNABLES": host_memory.HUGE_PAGES_TUNABLE}
    assert host_memory.huge_pages_environment(tunable) is None
    assert host_memory.huge_pages_environment({host_memory.HUGE_PAGES_ENV: "0"}) is None
    assert host_memory.huge_pages_environment({host_memory.HUGE_PAGES_ENV: "applied"}) is None
