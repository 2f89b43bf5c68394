"""t5x_like: BERT-era pretraining families in JAX/Flax, from a laptop CPU to a TPU pod."""

import os
import sys

if sys.argv and os.path.basename(sys.argv[0]) == "t5x-like":
    # The command restarts itself with huge pages for glibc's large blocks (on by default), and
    # keeps freed memory for reuse if asked (host_memory.py); both before JAX's threads.
    from t5x_like import host_memory

    host_memory.restart_with_huge_pages()
    if host_memory.opted_in():
        host_memory.keep_freed_memory()

from t5x_like import platforms  # noqa: E402

# Before JAX is first imported: JAX_PLATFORMS=cpu on a host with no TPU or NVIDIA GPU (else
# libtpu and the CUDA plugin log their failed probes), and no CUDA no-driver notices.
platforms.start()

import flax  # noqa: E402

# Modules name logical axes only; partitioning.py maps them to mesh axes through one rules
# table. Flax's eager sharding would instead require the names to be mesh axes at creation.
flax.config.update("flax_always_shard_variable", False)

__version__ = "0.1.0"
