"""Keep freed host memory in the process, so XLA:CPU's step buffers are not faulted in each step.

XLA:CPU allocates a step's temporaries afresh at every execution (1.8 GB for the T5 ``make bench``
config). glibc serves blocks that large with ``mmap`` and unmaps them on free, so the kernel
maps and zeroes every page again on the next step: 410,000 minor page faults per step there,
and ~15% of the step time on a 2-core VM. Turning off glibc's ``mmap`` path, keeping up to 2 GiB
of free heap and using one arena (a thread other than the main one would otherwise ``mmap``
large blocks from its own arena anyway) brings the faults to zero after the first step.

The price: the process keeps its peak heap until it exits, as a training job does anyway.
Set ``T5X_LIKE_SYSTEM_MALLOC=1`` to leave glibc's defaults alone. Threads pick their arena
at their first allocation, so this runs when ``t5x_like`` is imported, before JAX starts its
threads; it does nothing off Linux or with another C library.
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
        libc.gnu_get_libc_version  # noqa: B018  (glibc only: musl has no mallopt parameters)
    except (OSError, AttributeError):
        return False
    settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _KEEP_FREE_BYTES), (_M_ARENA_MAX, 1))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)
