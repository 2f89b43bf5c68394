"""TensorFlow only feeds data here: keep it on the CPU and quiet.

JAX owns the accelerators; a TensorFlow that also grabbed the GPU would reserve most of its
memory. ``configure()`` runs once, before the first tf.data pipeline is built.
"""

from __future__ import annotations

import functools
import os


@functools.cache
def configure() -> None:
    """Hide GPUs from TensorFlow and lower its C++ log level (idempotent)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF already initialised its devices (someone else ran an op first)
        pass
