"""Keep freed host memory in the process, so XLA:CPU's step buffers are not faulted in each step.

XLA:CPU allocates a step's temporaries afresh at every execution (1.3 GB for the T5
``make bench`` config). glibc serves blocks that large with ``mmap`` and unmaps them on free,
so the kernel maps and zeroes every page again on the next step: 410,000 minor page faults a
step there, ~20% of the step time on a 2-core VM. Turning off glibc's ``mmap`` path, keeping
up to 2 GiB of free heap and using one arena (a thread other than the main one would still
``mmap`` large blocks from its own arena) brings the faults to zero after the first step.

The price is memory: the process keeps what it freed, and on that config its peak RSS rose
from 2.1 to 4-6 GB. glibc's ``glibc.malloc.hugetlb=1`` tunable (huge pages for those blocks)
cost no memory but was slower, and uneven from step to step (benchmarks/RESULTS.md).

The ``t5x-like`` command applies this when ``t5x_like`` is imported, before JAX starts its
threads (each thread keeps the arena it first used); ``T5X_LIKE_SYSTEM_MALLOC=1`` opts out.
A program that imports ``t5x_like`` can call ``keep_freed_memory()`` first thing. Off Linux,
or with another C library, it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys

OPT_OUT_ENV = "T5X_LIKE_SYSTEM_MALLOC"

# mallopt(3) parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_KEEP_FREE_BYTES = 2**31 - 1  # mallopt takes an int


def keep_freed_memory() -> bool:
    """Apply the settings above; True if glibc accepted all of them."""
    if os.environ.get(OPT_OUT_ENV, "") not in ("", "0") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018  (glibc only: musl has no such mallopt params)
    except (OSError, AttributeError):
        return False
    settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _KEEP_FREE_BYTES), (_M_ARENA_MAX, 1))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)
