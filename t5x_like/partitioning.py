"""The device mesh and the rules that map logical axis names to mesh axes.

Modules only name their axes (``embed``, ``mlp``, ``heads``, ``kv``, ``vocab``, ``layers``, ...);
everything about placement lives here. The mesh is always ``(data, fsdp, tensor)``. A preset
(``mesh.rules``) says which logical axes go over which mesh axes; ``mesh.rules_override``
changes single names (``"embed=fsdp,mlp=tensor,heads=none,batch=data+fsdp"``):

- ``dp``: every weight replicated, batches split over ``data`` (and ``fsdp``, if it is > 1).
- ``fsdp``: ZeRO-3. Weights and optimizer state sharded over ``fsdp``; XLA gathers each layer's
  weights where they are used. ``embed`` carries ``fsdp``; a weight without an ``embed`` dim
  (or whose ``embed`` dim ``fsdp`` does not divide) is sharded on its largest dim that ``fsdp``
  divides, never on the stacked ``layers`` dim that ``scan`` walks.
- ``tensor``: Megatron. ``heads``, ``mlp`` and ``vocab`` over ``tensor``; batches over ``data``.
- ``fsdp_tensor`` (the default): both. With ``fsdp = tensor = 1`` it is plain data parallelism.

Batches always split over ``data`` and ``fsdp``: an fsdp group holds different examples and
shares weights, as in ZeRO. Optimizer state takes the shardings JAX's own rules give its
leaves (``opt_state_shardings``), so Adam's moments follow their parameter and Adafactor's
factored statistics keep the sharding of the parameter dims they keep.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np
import optax
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from t5x_like.errors import UserError
from t5x_like.models import activation_sharding

MESH_AXES = ("data", "fsdp", "tensor")

# Every logical axis name a module or a batch may use. A name missing here is a typo or a new
# axis: it is refused (``logical_to_mesh``) rather than silently replicated.
LOGICAL_AXES = (
    "batch",  # examples in a batch
    "length",  # positions in a sequence (activations only)
    "embed",  # the model width
    "mlp",  # feed-forward hidden units
    "heads",  # attention heads
    "kv",  # per-head width
    "vocab",  # embedding / output rows
    "layers",  # stacked layers (scan)
    "relpos_buckets",  # T5 relative-position buckets
    "position",  # learned absolute positions
    "type",  # token-type (segment) embeddings
    "segments",  # XLNet relative segment encodings
    "span_parts",  # SpanBERT's (left, right, position) inputs
    "classes",  # classification outputs
)

Rules = Mapping[str, tuple[str, ...]]  # logical name -> mesh axes (empty = replicated)

_NONE: dict[str, tuple[str, ...]] = {name: () for name in LOGICAL_AXES}
_BATCH = {"batch": ("data", "fsdp")}
_FSDP = {"embed": ("fsdp",)}
_TENSOR = {"mlp": ("tensor",), "heads": ("tensor",), "vocab": ("tensor",)}
PRESETS: dict[str, Rules] = {
    "dp": {**_NONE, **_BATCH},
    "fsdp": {**_NONE, **_BATCH, **_FSDP},
    "tensor": {**_NONE, **_BATCH, **_TENSOR},
    "fsdp_tensor": {**_NONE, **_BATCH, **_FSDP, **_TENSOR},
}
DEFAULT_RULES = PRESETS["fsdp_tensor"]
_ACTIVATION_AXES = ("batch", "length")  # never on a weight


# --------------------------------------------------------------------------- rules


def parse_override(text: str) -> dict[str, tuple[str, ...]]:
    """``"embed=fsdp,mlp=tensor,heads=none,batch=data+fsdp"`` -> {name: mesh axes}."""
    out: dict[str, tuple[str, ...]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = (s.strip() for s in item.partition("="))
        if not sep:
            raise UserError(
                f"mesh.rules_override item {item!r} has no '='; write e.g. "
                "'embed=fsdp,mlp=tensor,heads=none' (join several mesh axes with '+')"
            )
        if name not in LOGICAL_AXES:
            raise UserError(
                f"mesh.rules_override names an unknown logical axis {name!r}; known: "
                f"{', '.join(LOGICAL_AXES)}"
            )
        axes = () if value.lower() in ("", "none") else tuple(value.split("+"))
        for axis in axes:
            if axis not in MESH_AXES:
                raise UserError(
                    f"mesh.rules_override maps {name!r} to {axis!r}, which is not a mesh axis; "
                    f"use {', '.join(MESH_AXES)} or none"
                )
        if len(set(axes)) != len(axes):
            raise UserError(f"mesh.rules_override maps {name!r} to {value!r}: an axis twice")
        out[name] = axes
    return out


def rules_from_config(mesh_config) -> dict[str, tuple[str, ...]]:
    """The preset ``mesh.rules`` with ``mesh.rules_override`` applied."""
    preset = mesh_config.get("rules", "fsdp_tensor")
    if preset not in PRESETS:
        raise UserError(f"mesh.rules must be one of {sorted(PRESETS)}, got {preset!r}")
    return {**PRESETS[preset], **parse_override(mesh_config.get("rules_override", ""))}


def logical_to_mesh(spec: Sequence[str | None] | None, rules: Rules = DEFAULT_RULES,
                    *, what: str = "an array") -> PartitionSpec:
    """Maps one logical spec (a name or None per array dim) through the rules.

    A mesh axis shards one dim only: a later dim asking for an axis already used gets less.
    """
    used: set[str] = set()
    out = []
    for name in spec or ():
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise UserError(
                f"{what} names the logical axis {name!r}, which partitioning.LOGICAL_AXES does "
                f"not know; use one of {', '.join(LOGICAL_AXES)} or add it there"
            )
        axes = tuple(a for a in rules[name] if a not in used)
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def _names(entry) -> tuple[str, ...]:
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def _fit(spec: PartitionSpec, shape: tuple[int, ...], sizes: Mapping[str, int],
         logical: Sequence[str | None], rules: Rules, what: str) -> PartitionSpec:
    """Drops mesh axes from dims they do not divide; ZeRO-3 puts ``fsdp`` somewhere.

    JAX needs every sharded dim divisible by its mesh axes, so a dim they do not divide is
    kept whole along them (reported once, to stderr). If the rules shard weights over
    ``fsdp`` and this one did not get it, it goes on the largest free dim that ``fsdp``
    divides (not ``layers``): every large weight is then split, whatever its names.
    """
    entries = list(tuple(spec) + (None,) * (len(shape) - len(spec)))
    for i, (dim, entry) in enumerate(zip(shape, entries, strict=True)):
        names = tuple(a for a in _names(entry) if sizes[a] > 1)
        if names and dim % math.prod(sizes[a] for a in names):
            print(f"note: {what} dim {i} (size {dim}) is not divisible by mesh axes {names} "
                  f"of size {math.prod(sizes[a] for a in names)}; it stays whole along them",
                  file=sys.stderr)
            names = ()
        entries[i] = None if not names else names[0] if len(names) == 1 else names
    zero3 = any("fsdp" in axes for name, axes in rules.items() if name not in _ACTIVATION_AXES)
    used = {a for e in entries for a in _names(e)}
    if zero3 and sizes["fsdp"] > 1 and "fsdp" not in used:
        free = [i for i, (dim, e, n) in enumerate(zip(shape, entries, logical, strict=True))
                if e is None and n != "layers" and dim % sizes["fsdp"] == 0]
        if free:
            entries[max(free, key=lambda i: (shape[i], -i))] = "fsdp"
    return PartitionSpec(*entries)


def param_specs(abstract_params: nnx.State, mesh: Mesh | AbstractMesh,
                rules: Rules = DEFAULT_RULES) -> dict:
    """Mesh PartitionSpecs (a pure dict like the params) from the logical names modules attach."""
    logical = nnx.to_pure_dict(nnx.get_partition_spec(abstract_params))
    shapes = nnx.to_pure_dict(abstract_params)
    sizes = dict(mesh.shape)

    def one(path, spec, leaf):
        what = "parameter " + "/".join(str(getattr(k, "key", k)) for k in path)
        names = tuple(spec) + (None,) * (len(leaf.shape) - len(spec))
        return _fit(logical_to_mesh(names, rules, what=what), leaf.shape, sizes, names, rules,
                    what)

    return jax.tree_util.tree_map_with_path(
        one, logical, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))


def param_shardings(abstract_params: nnx.State, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> dict:
    """NamedShardings (a pure dict like the params)."""
    return named(mesh, param_specs(abstract_params, mesh, rules))


def opt_state_specs(tx: optax.GradientTransformation, abstract_params, specs: dict,
                    mesh: Mesh | AbstractMesh):
    """PartitionSpecs of ``tx.init(params)``'s leaves, as JAX's sharding-in-types rules derive them.

    ``tx.init`` is traced on an abstract mesh with Explicit axes, where every array carries
    its sharding: moments shaped like a parameter get its spec, a reduction (Adafactor's
    row/column statistics are means over one dim) keeps the specs of the dims it keeps, and
    counters and placeholders come out replicated. Nothing is guessed from shapes.
    """
    explicit = AbstractMesh(tuple(mesh.shape.values()), tuple(mesh.shape),
                            axis_types=(AxisType.Explicit,) * len(mesh.shape))
    typed = jax.tree.map(
        lambda leaf, spec: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                sharding=NamedSharding(explicit, spec)),
        abstract_params, specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    with jax.sharding.use_abstract_mesh(explicit):
        shapes = jax.eval_shape(tx.init, typed)
    return jax.tree.map(
        lambda s: s.sharding.spec if s.sharding is not None else PartitionSpec(), shapes)


def named(mesh: Mesh, specs):
    """NamedShardings on ``mesh`` for a tree of PartitionSpecs."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


# --------------------------------------------------------------------------- mesh and batches


DCN_AXES = {"data": "dcn_data", "fsdp": "dcn_fsdp"}  # mesh axes that may span slices


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh; one size may be -1 to take the remaining devices.

    ``mesh.data``, ``mesh.fsdp`` and ``mesh.tensor`` lay out one slice (its fast ICI links);
    ``mesh.dcn_data`` and ``mesh.dcn_fsdp`` multiply the data and fsdp axes across slices
    (the slower data-center network), so the mesh's data axis is ``data * dcn_data``. With
    one slice (both 1) this is ``jax.make_mesh``, which refuses devices on several slices.
    """
    devices = list(devices if devices is not None else jax.devices())
    dcn = [int(mesh_config.get(DCN_AXES.get(name, ""), 1)) for name in MESH_AXES]
    num_slices = math.prod(dcn)
    slices = device_slices(devices, num_slices)
    per_slice = len(slices[0])
    sizes = [int(mesh_config[name]) for name in MESH_AXES]
    where = "" if num_slices == 1 else " per slice"
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if per_slice % known:
            raise UserError(
                f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} cannot fill {per_slice} "
                f"devices{where}: {per_slice} is not divisible by {known}; change mesh.* in "
                "the config"
            )
        sizes[sizes.index(-1)] = per_slice // known
    if math.prod(sizes) != per_slice:
        raise UserError(
            f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {math.prod(sizes)} devices"
            f"{where} but {per_slice} are available{where}; make mesh.data * mesh.fsdp * "
            f"mesh.tensor equal {per_slice} or set one of them to -1"
        )
    auto = (AxisType.Auto,) * len(MESH_AXES)
    if num_slices == 1:
        return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=auto, devices=devices)
    if _has_slices(devices):
        grid = mesh_utils.create_hybrid_device_mesh(sizes, dcn, devices,
                                                    allow_split_physical_axes=True)
    elif len({d.process_index for d in devices}) == num_slices:  # GPU nodes: DCN = hosts
        grid = mesh_utils.create_hybrid_device_mesh(sizes, dcn, devices, process_is_granule=True,
                                                    allow_split_physical_axes=True)
    else:  # one process, no slices (CPU): equal consecutive groups stand in for slices
        meshes = [mesh_utils.create_device_mesh(sizes, group, allow_split_physical_axes=True)
                  for group in slices]
        order = np.arange(num_slices).reshape(dcn)
        grid = np.block(np.vectorize(lambda i: meshes[i], otypes=[object])(order).tolist())
    return Mesh(grid, MESH_AXES, axis_types=auto)


def _has_slices(devices: Sequence[jax.Device]) -> bool:
    """TPU devices are on slices (one, when a single-slice description has no slice_index).
    GPU devices carry a ``slice_index`` too (their NVLink partition, 0 on every H100 host), so
    theirs is ignored: a GPU cluster's cross-host granule is the host (``process_index``)."""
    return all(d.platform == "tpu" for d in devices)


def _slice_index(device: jax.Device) -> int:
    return getattr(device, "slice_index", None) or 0


def device_slices(devices: Sequence[jax.Device], num_slices: int) -> list[list[jax.Device]]:
    """The devices grouped by slice: TPU slices (``slice_index``), else processes when there
    are ``num_slices`` of them (GPU hosts), else, in one process, ``num_slices`` equal groups
    of consecutive devices (CPU), so that a multislice mesh can be tested on fake devices."""
    devices = list(devices)
    setting = ("mesh.dcn_data * mesh.dcn_fsdp = "
               f"{num_slices}; set mesh.dcn_data (and mesh.dcn_fsdp) so that their product is")
    if _has_slices(devices):
        found = sorted({_slice_index(d) for d in devices})
        if len(found) != num_slices:
            raise UserError(f"the {len(devices)} devices are on {len(found)} slice(s) but "
                            f"{setting} {len(found)}")
        groups = [[d for d in devices if _slice_index(d) == s] for s in found]
    elif num_slices == 1:
        return [devices]
    else:
        processes = sorted({d.process_index for d in devices})
        if len(processes) == num_slices:
            groups = [[d for d in devices if d.process_index == p] for p in processes]
        elif len(processes) == 1 and len(devices) % num_slices == 0:
            step = len(devices) // num_slices
            groups = [devices[i:i + step] for i in range(0, len(devices), step)]
        else:
            raise UserError(f"{len(devices)} devices in {len(processes)} process(es) cannot "
                            f"form {num_slices} slices: {setting} 1 or {len(processes)}")
    if len({len(g) for g in groups}) != 1:
        raise UserError(f"the slices hold different numbers of devices "
                        f"({sorted(len(g) for g in groups)}); a multislice mesh needs equal ones")
    return groups


def slice_of_devices(mesh: Mesh) -> np.ndarray:
    """Each mesh position's slice (TPU ``slice_index``; else its process, the granule of a GPU
    cluster's DCN), flat in the mesh's device order: what splits collectives into ICI and DCN."""
    flat = list(mesh.devices.flat)
    if _has_slices(flat):
        return np.array([_slice_index(d) for d in flat])
    return np.array([d.process_index for d in flat])


def check_axes_used(mesh: Mesh, rules: Rules) -> None:
    """A mesh axis of size > 1 that no rule uses would only repeat the same work."""
    used = {a for axes in rules.values() for a in axes}
    for axis in MESH_AXES:
        if mesh.shape[axis] > 1 and axis not in used:
            raise UserError(
                f"mesh.{axis}={mesh.shape[axis]} but no logical axis is sharded over {axis!r} "
                f"with these rules (mesh.rules / mesh.rules_override): set mesh.{axis}=1 or "
                f"pick rules that use it"
            )


def batch_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """Batches split their leading dim over the data axes; every other dim is whole."""
    return NamedSharding(mesh, logical_to_mesh(("batch",), rules, what="the batch"))


def activation_resolver(mesh: Mesh, rules: Rules) -> activation_sharding.Resolver:
    """Logical names -> NamedSharding on ``mesh`` for the activations models ``constrain``.

    A mesh axis that does not divide its dim (a micro-batch smaller than the data axes, a
    one-token decoder input) is dropped from that dim rather than refused.
    """
    sizes = dict(mesh.shape)

    def resolve(names: Sequence[str | None], shape: tuple[int, ...]) -> NamedSharding:
        spec = logical_to_mesh(names, rules, what="an activation")
        entries = []
        for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)),
                              strict=True):
            axes = tuple(a for a in _names(entry) if sizes[a] > 1)
            while axes and dim % math.prod(sizes[a] for a in axes):
                axes = axes[:-1]
            entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
        return NamedSharding(mesh, PartitionSpec(*entries))

    return resolve


def with_activation_sharding(fn: Callable, mesh: Mesh, rules: Rules) -> Callable:
    """``fn`` traced with its models' activations pinned by ``rules`` on ``mesh`` (the batch
    over ``data`` and ``fsdp``): what keeps fsdp from leaving each chip the whole batch."""
    resolver = activation_resolver(mesh, rules)

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with activation_sharding.resolving(resolver):
            return fn(*args, **kwargs)

    return traced


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> int:
    """How many different slices of each batch the mesh holds."""
    (axes,) = logical_to_mesh(("batch",), rules, what="the batch")
    return int(np.prod([mesh.shape[a] for a in _names(axes)]))
