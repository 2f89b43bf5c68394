"""Which JAX backend t5x_like starts, decided before JAX is first imported (package import).

With ``JAX_PLATFORMS`` unset JAX tries every backend whose plugin is installed: on a CPU host
with the test extra, libtpu logs "Failed to find host bounds ... TPU_WORKER_HOSTNAMES" and the
CUDA plugin a traceback ("Unable to load CUDA") before JAX falls back to the CPU. So t5x_like
sets ``JAX_PLATFORMS=cpu`` when the host has neither accelerator, detected the way JAX itself
does (``jax/_src/hardware_utils.py``: a Google PCI device for a TPU, ``/dev/nvidia0``,
``/dev/nvidiactl`` or ``/dev/dxg`` for an NVIDIA GPU; plus ``/dev/accel*``, the TPU VM's device
files), and leaves the choice to JAX where one is present or a remote backend is named. The
CUDA plugin's libraries also log "Could not find cuda drivers" as they load, whatever
``JAX_PLATFORMS`` says; on a host without an NVIDIA GPU those lines are filtered out while JAX
and the plugin load, and nothing else is.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

GOOGLE_PCI_VENDOR = "0x1ae0"
NVIDIA_DEVICE_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg")
# What the CUDA libraries print when they find no driver; nothing else is filtered.
_NO_GPU_NOTICE = re.compile(r"cudart_stub\.cc:\d+\] Could not find cuda drivers|"
                            r"^WARNING: All log messages before absl::InitializeLog\(\)|"
                            r"cuda_platform\.cc:\d+\] failed call to cuInit")


def has_tpu(root: str = "/") -> bool:
    """A TPU chip on this host: a Google PCI device (as JAX looks for) or a TPU device file."""
    for vendor in glob.glob(os.path.join(root, "sys/bus/pci/devices/*/vendor")):
        with contextlib.suppress(OSError):
            if Path(vendor).read_text().strip() == GOOGLE_PCI_VENDOR:
                return True
    return bool(glob.glob(os.path.join(root, "dev/accel*")))


def has_nvidia_gpu(root: str = "/") -> bool:
    """An NVIDIA GPU visible to this host (JAX's own test: one of its device files)."""
    return any(os.path.exists(os.path.join(root, f.lstrip("/"))) for f in NVIDIA_DEVICE_FILES)


def default_platforms(root: str = "/") -> str | None:
    """``JAX_PLATFORMS`` for a run that did not set it: ``"cpu"`` on a host with no TPU and no
    NVIDIA GPU, else None (JAX picks the accelerator, as it does without us)."""
    return None if has_tpu(root) or has_nvidia_gpu(root) else "cpu"


@contextlib.contextmanager
def without_no_gpu_notices() -> Iterator[None]:
    """Runs the body with file descriptor 2 captured, then writes back every line except the
    CUDA libraries' no-driver notices (C++ logging, which no Python setting silences)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode(errors="replace").splitlines(True)
                    if not _NO_GPU_NOTICE.search(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def start() -> None:
    """Before t5x_like's first JAX import: pick ``JAX_PLATFORMS`` if unset (above), and where
    the CUDA plugin is installed but no NVIDIA GPU is, load JAX and the plugin's library with
    their no-driver notices filtered (a library logs once, when it is first loaded)."""
    remote = os.environ.get("JAX_BACKEND_TARGET") or os.environ.get("PJRT_NAMES_AND_LIBRARY_PATHS")
    if "JAX_PLATFORMS" not in os.environ and not remote and (platforms := default_platforms()):
        os.environ["JAX_PLATFORMS"] = platforms
    try:
        plugin_installed = importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    except ModuleNotFoundError:  # no jax_plugins namespace at all
        plugin_installed = False
    if has_nvidia_gpu() or not plugin_installed:
        return
    import ctypes

    with without_no_gpu_notices():
        import jax  # noqa: F401  (jaxlib loads the plugin's CUDA kernels' libraries here)
        import jax_plugins.xla_cuda12 as plugin

        library = Path(plugin.__file__).parent / "xla_cuda_plugin.so"
        if library.exists():
            ctypes.CDLL(str(library))  # what JAX loads when it registers the plugin
