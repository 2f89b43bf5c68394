"""Host memory for XLA:CPU's step buffers: huge pages by default, keeping freed memory on request.

XLA:CPU allocates a compiled call's temporaries afresh at every execution (1.3 GB for the T5
``make bench`` config), and YNNPACK its 32 MiB scratch buffers at every matmul that needs one.
glibc serves blocks that large with ``mmap`` and unmaps them on free, so the kernel maps and
zeroes every page again: 66,000 minor page faults a step at 10 steps a call (``getrusage``).

**Huge pages (default for the command).** With ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` glibc
advises transparent huge pages for the blocks it maps, and the kernel faults them in 2 MiB at
a time: 2,250 faults a step, for ~5% more peak RSS (2162 against 2062 MiB in the bench's
A/B). The T5 bench step ran 0.936x the time (5 alternating process pairs, 0.879-0.985x, every
pair faster; 2026-12-05), 0.833x at one step a call, and 0.994x (0.961-1.026x) when the page
cache had taken the host's free memory: no gain there, and no stall. (At one step a call on
an earlier host, 3 steps of 10 took 3-5x as long: the kernel compacting memory for huge
pages, presumably; benchmarks/RESULTS.md has both.) glibc reads its tunables when a process
starts, so the ``t5x-like`` command restarts itself (``os.execve``: same process id,
arguments and interpreter options) with the tunable added, where transparent huge pages are
``madvise`` and glibc is 2.35 or newer. ``always`` needs no advice and ``never`` takes none.
``T5X_LIKE_HUGE_PAGES=0`` turns it off.

**Keeping freed memory (opt-in).** Turning off glibc's ``mmap`` path, keeping up to 2 GiB of
free heap and using one arena (a thread other than the main one would still ``mmap`` large
blocks from its own arena) brings the faults to zero after the first step. The price is memory:
XLA:CPU's next temporary block does not always fit where the last one was freed, so the heap
grows by whole blocks (RSS rose in steps of 1.26 GB): at one step a call the peak RSS rose from
2.2 to 7.1 GB (3.8x PyTorch's) for a 1.225x faster step (median of 5 interleaved runs,
0.958-1.379x). ``T5X_LIKE_KEEP_FREED_MEMORY=1`` makes the command apply it when ``t5x_like`` is
imported, before JAX starts its threads (each thread keeps the arena it first used); a program
that imports ``t5x_like`` can call ``keep_freed_memory()`` first thing. Off Linux, or with
another C library, neither does anything.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Mapping

OPT_IN_ENV = "T5X_LIKE_KEEP_FREED_MEMORY"
HUGE_PAGES_ENV = "T5X_LIKE_HUGE_PAGES"  # "0": off; the command sets "applied" when it restarts
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
_THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"

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
    if not sys.platform.startswith("linux") or _glibc_version() is None:
        return False  # glibc only: musl has no such mallopt params
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _KEEP_FREE_BYTES), (_M_ARENA_MAX, 1))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)


def transparent_huge_pages_mode() -> str | None:
    """The kernel's transparent huge page mode (``always``, ``madvise``, ``never``), or None."""
    try:
        with open(_THP_MODE_FILE) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def _glibc_version() -> tuple[int, ...] | None:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    except (AttributeError, ValueError, OSError):
        return None
    return tuple(int(part) for part in version.split(".")[:2]) if name == "glibc" else None


def huge_pages_environment(env: Mapping[str, str]) -> dict[str, str] | None:
    """``env`` with glibc's huge-page tunable added, or None where it would change nothing:
    turned off (``T5X_LIKE_HUGE_PAGES=0``), already set, not glibc 2.35+, or transparent huge
    pages not ``madvise`` (``always`` backs large blocks without being asked; ``never``)."""
    tunables = env.get("GLIBC_TUNABLES", "")
    if (env.get(HUGE_PAGES_ENV, "") in ("0", "applied") or "glibc.malloc.hugetlb=" in tunables
            or (_glibc_version() or (0,)) < (2, 35) or transparent_huge_pages_mode() != "madvise"):
        return None
    return {**env, "GLIBC_TUNABLES": ":".join(t for t in (tunables, HUGE_PAGES_TUNABLE) if t),
            HUGE_PAGES_ENV: "applied"}


def restart_with_huge_pages() -> None:
    """Re-executes this process (same id, arguments and interpreter options) with
    ``huge_pages_environment``; returns only where that is None or the exec fails. glibc reads
    its tunables when the process starts, so this must run before anything else has been done."""
    env = huge_pages_environment(os.environ)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:  # an interpreter that cannot be started again runs on without huge pages
        return
