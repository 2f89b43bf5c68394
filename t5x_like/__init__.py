"""t5x_like: BERT-era pretraining families in JAX/Flax, from a laptop CPU to a TPU pod."""

from t5x_like import host_memory

KEEPS_FREED_HOST_MEMORY = host_memory.keep_freed_memory()  # first: before JAX starts threads

import flax  # noqa: E402

# Modules name logical axes only; partitioning.py maps them to mesh axes through one rules
# table. Flax's eager sharding would instead require the names to be mesh axes at creation.
flax.config.update("flax_always_shard_variable", False)

__version__ = "0.1.0"
