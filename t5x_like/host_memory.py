"""Transparent huge pages for glibc's large blocks, so XLA:CPU's step buffers fault in quickly.

XLA:CPU allocates a step's temporaries afresh at every execution (1.3 GB for the T5
``make bench`` config). glibc maps blocks that large from the kernel and unmaps them on free,
so every step faults them in again 4 KiB at a time: 410,000 minor page faults a step there,
~20% of the step time on a 2-core VM. glibc's ``glibc.malloc.hugetlb=1`` tunable makes those
mappings ask for transparent huge pages (kernel THP mode ``madvise`` or ``always``): 40x fewer
faults and the same memory. Keeping freed memory in the process instead (``mallopt``) removed
the faults too but held 2.4 GB more at peak (benchmarks/RESULTS.md).

glibc reads tunables only when a process starts, so the ``t5x-like`` command re-executes
itself once with the tunable added to ``GLIBC_TUNABLES``; ``T5X_LIKE_SYSTEM_MALLOC=1`` opts
out. Importing ``t5x_like`` changes nothing: a program of your own can set the variable itself.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Mapping

OPT_OUT_ENV = "T5X_LIKE_SYSTEM_MALLOC"
TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_version() -> tuple[int, int] | None:
    try:
        version = ctypes.CDLL("libc.so.6").gnu_get_libc_version
    except (OSError, AttributeError):  # not Linux, or not glibc
        return None
    version.restype = ctypes.c_char_p
    major, minor = version().decode().split(".")[:2]
    return int(major), int(minor)


def _kernel_offers_huge_pages() -> bool:
    try:
        with open(THP_MODE_FILE) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def huge_page_environment(env: Mapping[str, str]) -> dict[str, str] | None:
    """``env`` with the tunable added, or None where nothing would change (opted out, already
    set, not glibc >= 2.35 on Linux, or a kernel without transparent huge pages)."""
    tunables = env.get("GLIBC_TUNABLES", "")
    if env.get(OPT_OUT_ENV, "") not in ("", "0") or TUNABLE in tunables.split(":"):
        return None
    if not sys.platform.startswith("linux") or (_glibc_version() or (0, 0)) < (2, 35):
        return None
    if not _kernel_offers_huge_pages():
        return None
    return {**env, "GLIBC_TUNABLES": f"{tunables}:{TUNABLE}" if tunables else TUNABLE}


def reexec_with_huge_pages() -> None:
    """Replace this process by the same command under ``huge_page_environment``, if it would
    change anything. Call it first thing in a program's entry point: nothing before it runs
    twice, nothing after it runs in the old process."""
    env = huge_page_environment(os.environ)
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
