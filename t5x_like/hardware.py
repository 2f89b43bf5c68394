"""Per-chip figures of the accelerators a pod rehearsal (``t5x-like compile``) plans for.

Each number is the vendor's published figure, with its page named beside it; the roofline in
``aot.py`` divides a compiled step's FLOPs, HBM traffic and collective bytes by them. They are
peaks: a real step reaches a fraction of each (README "Pod rehearsal" says what is left out).
"""

from __future__ import annotations

import dataclasses

GB = 1e9
GIB = 2.0**30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: float  # HBM capacity per chip
    peak_flops: float  # dense bf16 FLOP/s per chip
    hbm_bandwidth: float  # bytes/s per chip
    ici_bandwidth: float  # bytes/s per chip, one direction (half the bidirectional figure)
    dcn_bandwidth: float | None  # bytes/s per chip across slices; None = not published
    source: str


# Keyed by the generation in a topology name ("v5p:8x8x8" -> "v5p").
CHIPS: dict[str, Chip] = {
    # docs.cloud.google.com/tpu/docs/v5p: 459 bf16 TFLOP/s, 95 GiB HBM at 2765 GBps,
    # bidirectional ICI 1200 GBps per chip, DCN 50 Gbps per chip.
    "v5p": Chip("TPU v5p", 95 * GIB, 459e12, 2765 * GB, 1200 * GB / 2, 50e9 / 8,
                "docs.cloud.google.com/tpu/docs/v5p"),
    # docs.cloud.google.com/tpu/docs/v5e: 197 bf16 TFLOP/s, 16 GB HBM at 819 GBps,
    # bidirectional ICI 400 GBps per chip; DCN 6.4 Tbps per 256-chip pod (2 x 100 Gbps NICs
    # per 8-chip host) = 25 Gbps per chip.
    "v5e": Chip("TPU v5e", 16 * GB, 197e12, 819 * GB, 400 * GB / 2, 6.4e12 / 256 / 8,
                "docs.cloud.google.com/tpu/docs/v5e"),
    # docs.cloud.google.com/tpu/docs/v6e: 918 bf16 TFLOP/s, 32 GB HBM at 1638 GBps,
    # bidirectional ICI 800 GBps per chip; no per-chip DCN figure on the page.
    "v6e": Chip("TPU v6e", 32 * GB, 918e12, 1638 * GB, 800 * GB / 2, None,
                "docs.cloud.google.com/tpu/docs/v6e"),
    # GPUs (``t5x-like compile --topology h100:2x8``): "ICI" is NVLink inside a host, "DCN" the
    # network across hosts. nvidia.com/en-us/data-center/h100 (datasheet, H100 SXM): bf16 989
    # TFLOP/s dense (1,979 with sparsity), 80 GB HBM3 at 3.35 TB/s, NVLink 900 GB/s
    # (bidirectional). Network: one 400 Gb/s ConnectX-7 (NDR InfiniBand) per GPU, as in a DGX
    # H100 (DGX H100 User Guide, "Network Modules": 8 OSFP ports, one per GPU) -- assumed; a
    # cloud host's own NICs may differ. HBM sizes are binary: XLA's H200 target config gives
    # exactly 141 GiB, its H100 and A100 ones 79.1 and 79.3 GiB (what CUDA leaves of 80 GiB).
    "h100": Chip("NVIDIA H100 SXM", 80 * GIB, 989e12, 3.35e12, 900 * GB / 2, 400e9 / 8,
                 "nvidia.com/en-us/data-center/h100; DGX H100 User Guide"),
    # nvidia.com/en-us/data-center/h200 (datasheet, H200 SXM): bf16 989 TFLOP/s dense (1,979
    # with sparsity), 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s; network as the DGX H100's
    # (DGX H200: eight 400 Gb/s ConnectX-7, one per GPU) -- assumed, as above.
    "h200": Chip("NVIDIA H200 SXM", 141 * GIB, 989e12, 4.8e12, 900 * GB / 2, 400e9 / 8,
                 "nvidia.com/en-us/data-center/h200; DGX H200 datasheet"),
    # nvidia.com/en-us/data-center/a100 (datasheet, A100 80GB SXM): bf16 312 TFLOP/s dense
    # (624 with sparsity), 80 GB HBM2e at 2,039 GB/s, NVLink 600 GB/s; network: one 200 Gb/s
    # ConnectX-6 (HDR InfiniBand) per GPU, as in a DGX A100 -- assumed.
    "a100": Chip("NVIDIA A100 SXM 80GB", 80 * GIB, 312e12, 2039 * GB, 600 * GB / 2, 200e9 / 8,
                 "nvidia.com/en-us/data-center/a100; DGX A100 datasheet"),
}


def chip_for_topology(topology: str) -> Chip | None:
    """The table's chip for ``"v5p:8x8x8"``-style names, or None (the report then has no
    HBM check or roofline, only what the compiler says)."""
    return CHIPS.get(topology.split(":", 1)[0].lower())
