"""GPU topologies for the pod rehearsal: NVIDIA GPUs described on a host without one.

The CUDA PJRT plugin (``jax-cuda12-plugin``, the ``[gpu-compile]`` extra) compiles for GPUs it
cannot see when it is handed XLA's description of the GPU (a ``GpuTargetConfigProto`` in text
form: SM count, clocks, memory, compute capability) and a topology string that the plugin
parses as ``<num-partitions>x<num-hosts-per-partition>x<num-devices-per-host>`` (its own error
message; a partition is an NVLink domain). An H100 or A100 host is its own NVLink domain, so
``h100:2x8`` (2 hosts of 8 GPUs) becomes ``2x1x8``; each device's ``process_index`` is its host,
which ``aot.py`` treats as a slice: collectives inside a host run on NVLink, across hosts on the
network. The target configs ship in ``t5x_like/gpu_targets/`` (README there names their source).
"""

from __future__ import annotations

import re
from pathlib import Path

from t5x_like import platforms
from t5x_like.errors import UserError

TARGETS_DIR = Path(__file__).parent / "gpu_targets"
# Generation in a topology name -> XLA's target config for it (t5x_like/gpu_targets/).
TARGETS = {"h100": "h100_sxm.txtpb", "h200": "h200.txtpb", "a100": "a100_sxm_80.txtpb"}
# Without a GPU nothing is autotuned, and XLA's Triton GEMM fusion then failed on T5 base's
# gradient matmuls ("Couldn't find output tile sizes that satisfy hlo: ... f32[912,768] dot");
# with it off those matmuls are cuBLAS calls. Same sharding, collectives and buffers; the
# fusions (and so some temporaries) may differ from a run on GPUs.
COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}


def is_gpu_topology(topology: str) -> bool:
    """Whether ``topology`` names a GPU (``h100:8``) rather than a TPU slice (``v5p:2x2x2``)."""
    return topology.split(":", 1)[0].lower() in TARGETS


def parse(topology: str) -> tuple[str, int, int]:
    """``"h100:2x8"`` -> ``("h100", 2, 8)``: generation, hosts, GPUs per host (``h100:8`` is
    one host)."""
    generation, _, shape = topology.partition(":")
    generation = generation.lower()
    m = re.fullmatch(r"(?:(\d+)x)?(\d+)", shape.strip())
    if generation not in TARGETS or not m:
        raise UserError(
            f"no GPU topology {topology!r}: name one as GPU:GPUS_PER_HOST or "
            f"GPU:HOSTSxGPUS_PER_HOST with GPU one of {', '.join(sorted(TARGETS))}, e.g. "
            "h100:8 (one host of 8) or h100:2x8 (two hosts of 8)")
    hosts, per_host = int(m.group(1) or 1), int(m.group(2))
    if hosts < 1 or per_host < 1:
        raise UserError(f"GPU topology {topology!r} has no GPUs: hosts and GPUs per host must "
                        "be >= 1")
    return generation, hosts, per_host


def devices(topology: str, num_slices: int = 1) -> list:
    """The compile-only device descriptions of ``topology`` (``h100:2x8``): hosts x GPUs."""
    generation, hosts, per_host = parse(topology)
    if num_slices != 1:
        raise UserError(f"--num-slices is for TPU slices; a GPU topology names its hosts "
                        f"instead (e.g. {generation}:{num_slices}x{per_host})")
    try:
        import jax_plugins.xla_cuda12  # noqa: F401  (the CUDA compiler)
        from jax.experimental import topologies
    except ImportError as e:
        raise UserError("compiling for GPUs needs the CUDA PJRT plugin: pip install "
                        "'.[gpu-compile]' (jax-cuda12-plugin and jax-cuda12-pjrt)") from e
    target = (TARGETS_DIR / TARGETS[generation]).read_text()
    try:
        with platforms.without_no_gpu_notices():  # the plugin's cuInit fails: no GPU here
            desc = topologies.get_topology_desc(platform="cuda", topology_name="",
                                                topology=f"{hosts}x1x{per_host}",
                                                target_config=target)
    except Exception as e:  # the plugin refused the description
        raise UserError(f"the CUDA plugin cannot describe {topology!r} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]})") from e
    return list(desc.devices)
