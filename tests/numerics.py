"""Comparing float32 results of two different compilations of the same math."""

import numpy as np


def assert_close_at_scale(actual, desired, rtol: float = 2e-6) -> None:
    """|actual - desired| within ``rtol`` of desired's largest magnitude.

    Two compiled programs (remat or not, scanned or unrolled, one batch or micro-batches) may
    sum in another order, which moves every element by a few float32 ulps of the array's scale
    (measured: up to 3e-7 of it), a relatively large change for its smallest elements.
    """
    desired = np.asarray(desired)
    np.testing.assert_allclose(actual, desired, rtol=0, atol=rtol * float(np.abs(desired).max()))
