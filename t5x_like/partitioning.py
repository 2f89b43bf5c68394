"""The device mesh and the one table that maps logical axis names to mesh axes.

Modules only name their axes (``embed``, ``mlp``, ``heads``, ``kv``, ``vocab``, ``layers``);
everything about placement lives here. The mesh is always ``(data, fsdp, tensor)``: with the
default rules and ``fsdp = tensor = 1`` this is plain data parallelism, and the fsdp/tensor
axes are already in every PartitionSpec, so scaling out is a change of config, not of code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from t5x_like.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or axes, or None = replicated). Batch goes over every axis that
# holds a different slice of the data; weights shard their large dims over fsdp (ZeRO-3) and
# heads/mlp/vocab over tensor (Megatron).
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("relpos_buckets", None),
)


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh; one size may be -1 to take the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [int(mesh_config[name]) for name in MESH_AXES]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise UserError(
                f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} cannot fill {len(devices)} "
                f"devices: {len(devices)} is not divisible by {known}; change mesh.* in the config"
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise UserError(
            f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {math.prod(sizes)} devices "
            f"but {len(devices)} are available; make mesh.data * mesh.fsdp * mesh.tensor equal "
            f"{len(devices)} or set one of them to -1"
        )
    return jax.make_mesh(
        tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def logical_to_mesh(spec: Sequence[str | None] | None, rules=LOGICAL_AXIS_RULES) -> PartitionSpec:
    """Maps one logical spec (a name per array dim) through the rules; unknown names replicate."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in spec or ():
        axes = table.get(name)
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if a not in used)  # a mesh axis shards one dim only
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def _fit(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Drops mesh axes from dims they do not divide (e.g. a vocab of 100 over 8 devices)."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[a] for a in names)
        fitted.append(axes if names and dim % size == 0 else None)
    return PartitionSpec(*fitted)


def param_shardings(abstract_params: nnx.State, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> dict:
    """NamedShardings (a pure dict like the params) from the logical names modules attached."""
    logical = nnx.to_pure_dict(nnx.get_partition_spec(abstract_params))
    shapes = nnx.to_pure_dict(abstract_params)
    return jax.tree.map(
        lambda spec, leaf: NamedSharding(
            mesh, _fit(logical_to_mesh(spec, rules), leaf.shape, mesh)
        ),
        logical,
        shapes,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def batch_sharding(mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> NamedSharding:
    """Batches split their leading dim over the data axes; every other dim is whole."""
    return NamedSharding(mesh, logical_to_mesh(("batch",), rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> int:
    """How many different slices of each batch the mesh holds."""
    (axes,) = logical_to_mesh(("batch",), rules)
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return int(np.prod([mesh.shape[a] for a in axes]))
