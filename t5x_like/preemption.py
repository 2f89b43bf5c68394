"""Preemption: notice that the run must stop soon, so the loop can checkpoint and exit 0.

Sources of a notice:

- SIGTERM, what Cloud TPU VMs, GKE, SLURM and ``docker stop`` send before killing a process.
  One process: our handler sets a flag (the step in flight finishes first). Several
  processes: JAX's distributed runtime already listens for SIGTERM and agrees with the
  other processes on a step to stop at (``multihost_utils.reached_preemption_sync_point``),
  so every process saves the same step; we install no handler then.
- A Compute Engine maintenance event (Cloud TPU/GCE only): a background thread reads the
  metadata server's ``instance/maintenance-event`` every ``train.maintenance_poll_seconds``.
  It starts only when the machine says it is a Google Compute Engine VM (a local DMI file);
  elsewhere, and in tests, nothing touches the network.

Time-based checkpoints (``train.checkpoint_every_minutes``) need the same agreement across
processes: ``agree`` takes process 0's decision.
"""

from __future__ import annotations

import signal
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import jax

METADATA_URL = "http://metadata.google.internal/computeMetadata/v1/instance/maintenance-event"
DMI_PRODUCT = Path("/sys/class/dmi/id/product_name")


def on_gce(product_file: Path = DMI_PRODUCT) -> bool:
    """True on a Google Compute Engine VM (Cloud TPU VMs included), from a local file only."""
    try:
        return "Google" in product_file.read_text()
    except OSError:
        return False


def read_maintenance_event(timeout_s: float = 2.0) -> str:
    """The metadata server's maintenance event: "NONE", or e.g. "TERMINATE_ON_HOST_MAINTENANCE"."""
    request = urllib.request.Request(METADATA_URL, headers={"Metadata-Flavor": "Google"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
        return response.read().decode().strip()


class Preemption:
    """Collects stop notices; ``requested(step)`` is asked once per step by every process."""

    def __init__(
        self,
        poll_seconds: float,
        *,
        gce: bool | None = None,
        read_event: Callable[[], str] = read_maintenance_event,
    ):
        self.reason: str | None = None
        self.multiprocess = jax.process_count() > 1
        self._previous = None
        self._stop = threading.Event()
        self._thread = None
        if not self.multiprocess and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        if poll_seconds > 0 and (on_gce() if gce is None else gce):
            self._thread = threading.Thread(
                target=self._poll, args=(poll_seconds, read_event), daemon=True,
                name="maintenance-event-poll",
            )
            self._thread.start()

    def _on_sigterm(self, signum, frame) -> None:
        self.reason = self.reason or "SIGTERM"

    def _poll(self, every_s: float, read_event: Callable[[], str]) -> None:
        while not self._stop.wait(every_s):
            try:
                event = read_event()
            except Exception:  # the metadata server is briefly unreachable: ask again later
                continue
            if event and event != "NONE":
                self.reason = self.reason or f"maintenance event {event}"
                return

    def requested(self, step: int, *, at_log_step: bool) -> str | None:
        """Why the run should checkpoint and stop after ``step`` (1-based), or None to go on.

        Every process must call this at every step with the same arguments: with several
        processes it is a synchronisation point, and at log steps it also shares each
        process's maintenance notice with the others (one tiny all-gather).
        """
        if not self.multiprocess:
            return self.reason
        import numpy as np
        from jax.experimental import multihost_utils

        if multihost_utils.reached_preemption_sync_point(step):
            return self.reason or "a preemption notice (SIGTERM) to one of the processes"
        if at_log_step:
            flags = multihost_utils.process_allgather(np.asarray(self.reason is not None))
            if np.any(flags):
                return self.reason or "a maintenance event on another host"
        return None

    def close(self) -> None:
        self._stop.set()
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def agree(flag: bool) -> bool:
    """Process 0's ``flag`` on every process (a decision from a clock must be shared)."""
    if jax.process_count() == 1:
        return flag
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag)))


class Clock:
    """Minutes since the last checkpoint, for ``train.checkpoint_every_minutes``."""

    def __init__(self, every_minutes: float):
        self.every_s = every_minutes * 60.0
        self.last = time.monotonic()

    def due(self) -> bool:
        return self.every_s > 0 and time.monotonic() - self.last >= self.every_s

    def reset(self) -> None:
        self.last = time.monotonic()
