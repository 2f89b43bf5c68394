"""Keep freed host memory in the process, so XLA:CPU's step buffers are not faulted in each step.

XLA:CPU allocates a step's temporaries afresh at every execution (1.3 GB for the T5
``make bench`` config). glibc serves blocks that large with ``mmap`` and unmaps them on free,
so the kernel maps and zeroes every page again on the next step: 410,000 minor page faults a
step there, ~20% of the step time on a 2-core VM. Turning off glibc's ``mmap`` path, keeping
up to 2 GiB of free heap and using one arena (a thread other than the main one would still
``mmap`` large blocks from its own arena) brings the faults to zero after the first step.

The price is memory, and it is why this is opt-in: the process keeps what it frees, and
XLA:CPU's next temporary block does not always fit where the last one was freed, so the
heap grows by whole blocks (RSS read after each step rose in steps of 1.26 GB, the
executable's temporary allocation): on that config the peak RSS rose
from 2.2 to 7.1 GB (3.8x PyTorch's), for a 1.225x faster step (median of 5 interleaved
runs, 0.958-1.379x; benchmarks/RESULTS.md). glibc's ``glibc.malloc.hugetlb=1`` tunable (huge
pages for those blocks) cost no memory, but some steps stalled 3-4x (the kernel
compacting memory, presumably: transparent huge pages defrag on madvise here).
``train.steps_per_call`` gets most of the gain at glibc's own memory: one call runs several
steps and reuses its temporaries between them.

``T5X_LIKE_KEEP_FREED_MEMORY=1`` makes the ``t5x-like`` command apply this when ``t5x_like``
is imported, before JAX starts its threads (each thread keeps the arena it first used). A
program that imports ``t5x_like`` can call ``keep_freed_memory()`` first thing. Off Linux, or
with another C library, it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys

OPT_IN_ENV = "T5X_LIKE_KEEP_FREED_MEMORY"

# mallopt(3) parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_KEEP_FREE_BYTES = 2**31 - 1  # mallopt takes an int


def opted_in() -> bool:
    """Whether ``T5X_LIKE_KEEP_FREED_MEMORY`` asks the command to keep freed memory."""
    return os.environ.get(OPT_IN_ENV, "") not in ("", "0")


def keep_freed_memory() -> bool:
    """Apply the settings above; True if glibc accepted all of them."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018  (glibc only: musl has no such mallopt params)
    except (OSError, AttributeError):
        return False
    settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _KEEP_FREE_BYTES), (_M_ARENA_MAX, 1))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)
