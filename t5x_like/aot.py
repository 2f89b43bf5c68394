"""Pod rehearsal: the real train step compiled ahead of time for a TPU topology, on any host.

``jax.experimental.topologies`` (with ``libtpu`` installed) describes the devices of a TPU
slice, or of several (``num_slices``), on a CPU machine; the experiment is built on them with
abstract state only (nothing is allocated) and ``jax.jit(...).lower(...).compile()`` runs the
TPU compiler. What it returns is the pod's own program: its per-chip memory, its FLOPs and,
from the optimized HLO, every collective it runs. MaxText's ``train_compile.py`` is the same
idea. A sharding, memory or layout mistake at pod scale is then found here, not on the pod.

The optimized HLO is read from the compiler's own dump (``xla_dump_to``): ``Compiled.as_text``
cannot print libtpu's modules with this jaxlib (an async-update instruction it does not know).

GPU topologies (``h100:2x8``: hosts x GPUs) come from ``aot_gpu.py``; a host plays the part of a
slice (NVLink inside it, the network across), and the GPU compiler gives no cost analysis, so
FLOPs are only ours and the HBM-traffic term of the roofline is missing.
"""

from __future__ import annotations

import glob
import math
import os
import re
import tempfile
import time
from collections import defaultdict

import jax
import ml_collections
import numpy as np

from t5x_like import aot_gpu, flops, hardware, partitioning
from t5x_like.errors import UserError

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}


# --------------------------------------------------------------------------- compiling


def topology_devices(topology: str, num_slices: int = 1) -> list:
    """The device descriptions of ``num_slices`` slices of ``topology`` (e.g. ``v5p:8x8x8``),
    or of a GPU topology's hosts (``h100:2x8``)."""
    from jax.experimental import topologies

    if aot_gpu.is_gpu_topology(topology):
        return aot_gpu.devices(topology, num_slices)

    # No chip is driven here, so several processes may load libtpu at once (parallel tests,
    # a rehearsal beside another); without this the second one stops at libtpu's lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if num_slices < 1:
        raise UserError(f"--num-slices must be >= 1, got {num_slices}")
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                            num_slices=num_slices)
    except Exception as e:  # libtpu missing, or a name it does not know
        raise UserError(
            f"no TPU topology {topology!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "name one as GENERATION:SHAPE, e.g. v5e:2x2, v5p:2x2x2, v5p:8x8x8, with libtpu "
            "installed (pip install '.[tpu]'), or a GPU one as h100:8 or h100:2x8"
        ) from e
    return list(desc.devices)


def abstract_batch(exp) -> dict:
    """Shapes, dtypes and shardings of one global batch, without reading data when the family
    reads plain token chunks (others: the shapes of their first real batch)."""
    from t5x_like.families.base import Family

    family, batch_size = exp.family, exp.config.data.batch_size
    if type(family).batches is Family.batches:
        shapes = {"tokens": jax.ShapeDtypeStruct((batch_size, family.raw_length), np.int32)}
    else:
        first = next(iter(family.batches(split="train", batch_size=batch_size, shuffle=False,
                                         repeat=True, skip_batches=0, shard_index=0,
                                         num_shards=1)))
        shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in first.items()}
    return {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=exp.batch_sharding)
            for k, s in shapes.items()}


def _compile(lowered, dump: str, exp):
    """Compiles with the optimized HLO dumped to ``dump``; a program too big for HBM is one
    sentence (the TPU compiler refuses it before it is ever run)."""
    options = {"xla_dump_to": dump, "xla_dump_hlo_as_text": True}
    if exp is not None and exp.mesh.devices.flat[0].platform == "gpu":
        options.update(aot_gpu.COMPILER_OPTIONS)
    try:
        return lowered.compile(compiler_options=options)
    except Exception as e:
        text = str(e)
        if "RESOURCE_EXHAUSTED" not in text and "out of memory" not in text.lower():
            raise
        if exp is None:
            raise
        raise UserError(_out_of_memory_sentence(text, exp)) from e


def largest_state_arrays(exp, k: int = 3) -> list[tuple[str, int]]:
    """The ``k`` largest per-chip shards of the state (parameters, optimizer state): name, bytes."""
    rows = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(exp.abstract_state()):
        shard = math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
        rows.append((jax.tree_util.keystr(path, simple=True, separator="/"), shard))
    return sorted(rows, key=lambda r: -r[1])[:k]


def _out_of_memory_sentence(text: str, exp) -> str:
    need = re.search(r"required for ([\w ]+?) \(([\d.]+\w?)\) exceeds available HBM "
                     r"\(([\d.]+\w?)\)", text)
    used = re.search(r"Used ([\d.]+\w?) of ([\d.]+\w?) hbm", text)
    if need:
        what = f"{need.group(1)} need {need.group(2)} of the chip's {need.group(3)} HBM"
    elif used:
        what = f"it uses {used.group(1)} of the chip's {used.group(2)} HBM"
    else:
        what = "the compiler ran out of HBM"
    biggest = ", ".join(f"{name} {size / 2**20:.0f} MiB" for name, size in
                        largest_state_arrays(exp))
    return (f"the step does not fit on one chip: {what} (largest state arrays per chip: "
            f"{biggest}); shard weights and optimizer state over more chips (mesh.fsdp, rules "
            "fsdp or fsdp_tensor), recompute activations (model.remat_policy=full), or lower "
            "data.batch_size / raise optimizer.grad_accum_steps")


def _optimized_hlo(dump: str, name: str) -> str:
    paths = sorted(glob.glob(os.path.join(dump, f"*{name}*after_optimizations.txt")))
    if not paths:
        raise RuntimeError(f"the compiler wrote no optimized HLO for {name} to {dump}")
    return open(paths[-1]).read()  # noqa: SIM115


def compile_lowered(lowered, name: str, exp=None) -> tuple:
    """(the compiled program, its optimized HLO text) for a lowered jitted function ``name``."""
    with tempfile.TemporaryDirectory() as dump:
        return _compile(lowered, dump, exp), _optimized_hlo(dump, name)


def compile_experiment(exp, *, eval_step: bool = True) -> dict:
    """``{'train': (compiled, hlo_text, seconds, arguments), 'eval': ...}`` for the
    experiment's steps (``arguments``: the abstract values each was compiled for)."""
    from t5x_like import train

    state = exp.abstract_state()
    batch = abstract_batch(exp)
    out = {}
    with tempfile.TemporaryDirectory() as dump:
        start = time.perf_counter()
        compiled = _compile(train.make_train_step(exp).lower(state, batch), dump, exp)
        out["train"] = (compiled, _optimized_hlo(dump, "train_step"),
                        time.perf_counter() - start, (state, batch))
        if eval_step:
            key = jax.eval_shape(lambda: jax.random.key(0))
            start = time.perf_counter()
            arguments = (state["params"], batch, key, state.get("carry"))
            compiled = _compile(train.make_eval_step(exp).lower(*arguments), dump, exp)
            out["eval"] = (compiled, _optimized_hlo(dump, "eval_step"),
                           time.perf_counter() - start, arguments)
    return out


# --------------------------------------------------------------------------- collectives


def _array_bytes(type_text: str) -> int:
    total = 0
    for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", type_text):
        if dtype in _DTYPE_BYTES:
            total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _split_top(text: str) -> list[str]:
    """Top-level elements of a tuple type ``(a, (b, c))`` -> ``['a', '(b, c)']``."""
    inner, depth, parts, start = text[1:-1], 0, [], 0
    for i, ch in enumerate(inner):
        depth += ch in "({[" and 1 or 0
        depth -= ch in ")}]" and 1 or 0
        if ch == "," and depth == 0:
            parts.append(inner[start:i].strip())
            start = i + 1
    parts.append(inner[start:].strip())
    return parts


def _mesh_groups(attrs: str) -> list[list[int]] | None:
    """Groups of the mesh-axes form ``replica_groups=mesh['a'=2,'b'=4] {'b'}`` (XLA's
    MeshAxesReplicaGroupList; ``, device_ids=(...)`` when not iota; sub-axes ``'a':(pre)size``):
    the devices laid out on the mesh, one group per combination of the other axes' positions."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\((\[[\d,]+\](?:T\([\d,]+\))?"
                  r"|[\d,\s]*)\))? \{([^}]*)\}", attrs)
    if not m:
        return None
    axes = re.findall(r"'?([\w.\-]+)'?=(\d+)", m.group(1))
    names, sizes = [a for a, _ in axes], [int(n) for _, n in axes]
    ids = np.arange(math.prod(sizes))
    if m.group(2) and m.group(2).startswith("["):  # iota form: [dims]T(perm) (XLA GPU)
        dims = [int(x) for x in re.match(r"\[([\d,]+)\]", m.group(2)).group(1).split(",")]
        perm = re.search(r"T\(([\d,]+)\)", m.group(2))
        ids = np.arange(math.prod(dims)).reshape(dims)
        if perm:
            ids = ids.transpose([int(x) for x in perm.group(1).split(",")])
        ids = ids.ravel()
    elif m.group(2):
        ids = np.array([int(x) for x in re.findall(r"\d+", m.group(2))])
    refs: dict[int, list[tuple[int, int, int]]] = defaultdict(list)  # dim -> (pre, size, order)
    for order, (name, pre, size) in enumerate(
            re.findall(r"'?([\w.\-]+)'?(?::\((\d+)\)(\d+))?", m.group(3))):
        dim = names.index(name)
        refs[dim].append((int(pre or 1), int(size or sizes[dim]), order))
    shape, grouped = [], []  # each mesh dim split into its sub-axes (XLA's reindexing)
    for dim, full in enumerate(sizes):
        prefix = 1
        for pre, size, order in sorted(refs.get(dim, [])):
            if pre != prefix:
                shape.append(pre // prefix)
            grouped.append((order, len(shape)))
            shape.append(size)
            prefix = pre * size
        if prefix != full or dim not in refs:
            shape.append(full // prefix)
    grouped_dims = [d for _, d in sorted(grouped)]
    rest = [d for d in range(len(shape)) if d not in grouped_dims]
    size = math.prod(shape[d] for d in grouped_dims)
    return ids.reshape(shape).transpose(rest + grouped_dims).reshape(-1, size).tolist()


def _groups(attrs: str, num_devices: int) -> list[list[int]]:
    """Device groups of a collective from ``replica_groups`` (list, iota or mesh-axes form) or
    ``source_target_pairs``; positions index the mesh's flat device order."""
    groups = _mesh_groups(attrs)
    if groups is not None:
        return groups
    m = re.search(r"(?:replica_groups|source_target_pairs)=\{(\{[\d,{} ]*\})?\}", attrs)
    if m:
        groups = [[int(x) for x in g.split(",") if x.strip()]
                  for g in re.findall(r"\{([\d, ]*)\}", m.group(1) or "")]
        return [g for g in groups if g] or [list(range(num_devices))]
    m = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", attrs)
    if m:
        shape = [int(x) for x in m.group(1).split(",")]
        ids = np.arange(math.prod(int(x) for x in m.group(2).split(",")))
        ids = ids.reshape([int(x) for x in m.group(2).split(",")])
        if m.group(3):
            ids = ids.transpose([int(x) for x in m.group(3).split(",")])
        return ids.reshape(shape[0], -1).tolist()
    return [list(range(num_devices))]


def _wire_bytes(kind: str, result_bytes: int, n: int) -> float:
    """Bytes each chip sends for one collective over groups of ``n`` (ring algorithms)."""
    if n <= 1:
        return 0.0
    return {"all-gather": result_bytes * (n - 1) / n,
            "reduce-scatter": result_bytes * (n - 1),
            "all-reduce": 2 * result_bytes * (n - 1) / n,
            "all-to-all": result_bytes * (n - 1) / n,
            "collective-permute": float(result_bytes)}[kind]


def _network(groups: list[list[int]], slice_of: np.ndarray) -> str:
    """DCN when a group spans slices, else ICI. (A multislice program is compiled per slice:
    its in-slice groups index that slice's chips; cross-slice traffic is ``send``/``recv``.)"""
    num = len(slice_of)
    return "DCN" if any(len({slice_of[i] for i in g if i < num}) > 1 for g in groups) else "ICI"


_MEGASCALE_KINDS = {"ALL_REDUCE": "all-reduce", "ALL_GATHER": "all-gather",
                    "REDUCE_SCATTER": "reduce-scatter", "ALL_TO_ALL": "all-to-all"}


def _megascale(type_text: str, attrs: str) -> tuple[str, int, int]:
    """A cross-slice collective: libtpu lowers it to a host-transfer ``send`` (and ``recv``)
    for the megascale runtime, tagged with its kind and the slices it spans
    (``_xla_megascale_target="{1,2}x{0:7}"``). Returns (kind, bytes this chip sends, slices);
    an all-gather's bytes are scaled to its result, as for the ICI ones."""
    kind = re.search(r'_xla_megascale_transfer_type="(\w+)"', attrs).group(1)
    kind = _MEGASCALE_KINDS.get(kind, "collective-permute")
    target = re.search(r'_xla_megascale_target="\{([^}]*)\}', attrs)
    n = 2
    if target:
        n = 0
        for item in target.group(1).split(","):
            lo, _, hi = item.partition(":")
            n += int(hi) - int(lo) + 1 if hi else 1
    nbytes = _array_bytes(_split_top(type_text)[0] if type_text.startswith("(") else type_text)
    return kind, nbytes * (n if kind == "all-gather" else 1), n


_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = (.*)$")
_CALLS = re.compile(r"\b(?:calls|to_apply|body|branch_computations|called_computations)="
                    r"(\{[^}]*\}|%?[\w.\-]+)")


def _opcode(rest: str) -> tuple[str, str, str]:
    """(type text, opcode, the text after the opcode's '(') of an instruction's right side."""
    if rest.startswith("("):
        depth = np.cumsum([(ch == "(") - (ch == ")") for ch in rest])
        end = int(np.argmax(depth == 0)) + 1
        type_text, tail = rest[:end], rest[end:].lstrip()
    else:
        type_text, _, tail = rest.partition(" ")
    opcode, _, after = tail.partition("(")
    return type_text, opcode.strip(), after


def _trip_count(attrs: str, computations: dict[str, list[str]]) -> int:
    """Iterations of a while loop: XLA's ``known_trip_count``, else the bound of a scan's
    condition (``counter < constant(N)``, the counter starting at 0 as ``scan``'s does);
    1 when neither is there (the loop's collectives then count once)."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', attrs)
    if known:
        return int(known.group(1))
    cond = re.search(r"condition=%?([\w.\-]+)", attrs)
    lines = computations.get(cond.group(1), []) if cond else []
    constants = [int(c) for line in lines for c in re.findall(r"s32\[\]\S* constant\((\d+)\)",
                                                              line)]
    compares = [line for line in lines if "compare(" in line and "direction=LT" in line]
    return constants[0] if len(constants) == 1 and len(compares) == 1 else 1


def _fused_reduce_scatter(name: str, lines: list[str]) -> str | None:
    """The all-reduce's attributes when computation ``name`` is a reduce-scatter in disguise:
    libtpu fuses a reduce-scatter as ``fusion(...), kind=kCustom, calls=%all-reduce-scatter``
    whose body all-reduces the whole array and keeps this chip's slice (a dynamic-slice). It
    moves reduce-scatter's bytes (its result x (n - 1)), not an all-reduce's of the whole array
    (2 x the whole x (n - 1) / n, twice as many); counted as the body reads, gradients under
    fsdp would look all-reduced."""
    reduces, root = {}, None
    for line in lines:
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        _, opcode, after = _opcode(m.group(1))
        target = re.match(r"^\s*(?:ROOT )?%?([\w.\-]+) =", line).group(1)
        if opcode in ("all-reduce", "all-reduce-start"):
            reduces[target] = after
        if line.lstrip().startswith("ROOT"):
            root = (opcode, after)
    if len(reduces) != 1:
        return None
    (reduce_name, attrs), = reduces.items()
    sliced = root is not None and root[0] == "dynamic-slice" and re.match(
        rf"\s*%?{re.escape(reduce_name)}\b", root[1])
    return attrs if sliced or name.startswith("all-reduce-scatter") else None


def collectives(hlo_text: str, slice_of: np.ndarray) -> list[dict]:
    """The collectives one step runs, per chip: kind, network (ICI within a slice, DCN across
    slices), count per step (ops inside a scanned loop count once per iteration) and bytes:
    result bytes, and bytes each chip sends (ring algorithms)."""
    computations: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        head = _COMPUTATION.match(line)
        if head and not line.startswith(" "):
            current = head.group(1)
            computations[current] = []
            if line.startswith("ENTRY"):
                entry = current
        elif current is not None and line.startswith(" "):
            computations[current].append(line)
    if entry is None:
        raise RuntimeError("no ENTRY computation in the optimized HLO")
    num = len(slice_of)
    memo: dict[str, dict] = {}

    def total(name: str, stack: tuple = ()) -> dict:
        if name in memo:
            return memo[name]
        sums: dict = defaultdict(lambda: np.zeros(3))
        for line in computations.get(name, ()):
            m = _INSTRUCTION.match(line)
            if not m:
                continue
            type_text, opcode, after = _opcode(m.group(1))
            base = opcode.removesuffix("-start")
            if base in COLLECTIVES and not opcode.endswith("-done"):
                result = type_text
                if opcode.endswith("-start") and base in ("all-gather", "collective-permute") \
                        and type_text.startswith("("):
                    parts = _split_top(type_text)
                    result = parts[1] if len(parts) > 1 else type_text
                nbytes = _array_bytes(result)
                groups = _groups(after, num)
                n = 2 if base == "collective-permute" else len(groups[0])
                sums[(base, _network(groups, slice_of))] += (1, nbytes,
                                                             _wire_bytes(base, nbytes, n))
            elif opcode == "send" and "_xla_megascale_transfer_type" in after:
                kind, nbytes, n = _megascale(type_text, after)
                sums[(kind, "DCN")] += (1, nbytes, _wire_bytes(kind, nbytes, n))
            elif opcode == "fusion" and (called := _CALLS.search(after)):
                callee = called.group(1).lstrip("%")
                attrs = _fused_reduce_scatter(callee, computations.get(callee, []))
                if attrs is not None:
                    nbytes = _array_bytes(type_text)
                    groups = _groups(attrs, num)
                    sums[("reduce-scatter", _network(groups, slice_of))] += (
                        1, nbytes, _wire_bytes("reduce-scatter", nbytes, len(groups[0])))
                    continue
            trips = 1
            if opcode == "while":
                trips = _trip_count(after, computations)
            for target in _CALLS.findall(after):
                for callee in re.findall(r"%?([\w.\-]+)", target):
                    if callee in computations and callee not in stack:
                        for key, v in total(callee, (*stack, name)).items():
                            sums[key] += trips * v
        memo[name] = sums
        return sums

    rows = [{"kind": k, "network": net, "count": int(v[0]), "bytes": float(v[1]),
             "wire_bytes": float(v[2])} for (k, net), v in total(entry).items()]
    return sorted(rows, key=lambda r: (r["network"], -r["wire_bytes"]))


# --------------------------------------------------------------------------- the report


def _cost(compiled) -> dict | None:
    """XLA's cost analysis, or None where the backend has none (the GPU compiler's)."""
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, list | tuple) else cost) or None


def _memory(compiled) -> dict:
    m = compiled.memory_analysis()
    out = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
           "aliased": m.alias_size_in_bytes, "temporaries": m.temp_size_in_bytes}
    out["total"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
    return out


def tiled_bytes(shard_shape: tuple[int, ...], itemsize: int, layout) -> int:
    """Bytes of one shard as the device lays it out: its dimensions in ``layout``'s
    major-to-minor order, the most minor ones rounded up to the first tile (a TPU keeps f32
    in (8, 128) tiles, so a (64, 6, 64) shard takes twice its size)."""
    if layout is None:
        return math.prod(shard_shape) * itemsize
    dims = [shard_shape[d] for d in layout.major_to_minor] or [1]  # a scalar fills a tile too
    tile = layout.tiling[0] if layout.tiling else ()
    for i, t in enumerate(reversed(tile), start=1):
        if i <= len(dims):
            dims[-i] = -(-dims[-i] // t) * t
    return math.prod(dims) * itemsize


def argument_tiling(compiled, args) -> dict:
    """{"shards": bytes of the arguments' shards on one chip, "tiled": the same in the
    compiled layouts}: what the compiler's argument bytes hold beyond the sharding rules."""
    leaves = jax.tree.leaves(args)
    formats = jax.tree.leaves(compiled.input_formats[0], is_leaf=lambda x: hasattr(x, "layout"))
    shards = tiled = 0
    for leaf, fmt in zip(leaves, formats, strict=True):
        shape = fmt.sharding.shard_shape(leaf.shape)
        shards += math.prod(shape) * leaf.dtype.itemsize
        itemsize = leaf.dtype.itemsize
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            # a key is laid out as its uint32 words: a minor dimension its shape does not show
            words = jax.eval_shape(jax.random.key_data, leaf)
            shape, itemsize = (*shape, *words.shape[leaf.ndim:]), words.dtype.itemsize
        tiled += tiled_bytes(shape, itemsize, getattr(fmt, "layout", None))
    return {"shards": shards, "tiled": tiled}


def _param_bytes_per_chip(exp) -> tuple[int, int]:
    """(bytes of all parameters, bytes of one chip's shards of them)."""
    whole = chip = 0
    for leaf in jax.tree.leaves(exp.abstract_state()["params"]):
        size = leaf.size * leaf.dtype.itemsize
        whole += size
        chip += math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
    return whole, chip


def roofline(chip: hardware.Chip | None, flops_per_chip: float, hbm_bytes: float | None,
             rows: list[dict]) -> dict | None:
    """Lower bounds on the step time from each resource alone; the step can be no faster than
    the largest (perfect overlap) and, without overlap, takes about their sum. A term whose
    input is unknown (``hbm_bytes`` None: no cost analysis) is NaN and left out."""
    if chip is None:
        return None
    ici = sum(r["wire_bytes"] for r in rows if r["network"] == "ICI")
    dcn = sum(r["wire_bytes"] for r in rows if r["network"] == "DCN")
    times = {"compute_s": flops_per_chip / chip.peak_flops,
             "hbm_s": float("nan") if hbm_bytes is None else hbm_bytes / chip.hbm_bandwidth,
             "ici_s": ici / chip.ici_bandwidth,
             "dcn_s": (dcn / chip.dcn_bandwidth) if chip.dcn_bandwidth else (
                 0.0 if not dcn else float("nan"))}
    bound = max((v for v in times.values() if v == v), default=0.0)
    return {**times, "step_s_bound": bound, "step_s_no_overlap": sum(
        v for v in times.values() if v == v), "mfu_bound": times["compute_s"] / bound
        if bound else None, "bound_by": max(
            (k for k in times if times[k] == times[k]), key=lambda k: times[k])}


def rehearse(config: ml_collections.ConfigDict, topology: str, num_slices: int = 1, *,
             eval_step: bool = True) -> dict:
    """Builds ``config`` on ``topology``'s devices, compiles its steps and returns the report
    (a dict; ``format_report`` prints it). A step that does not fit in HBM raises UserError."""
    from t5x_like import experiment

    devices = topology_devices(topology, num_slices)
    start = time.perf_counter()
    exp = experiment.build(config, devices=devices)
    steps = compile_experiment(exp, eval_step=eval_step)
    chip = hardware.chip_for_topology(topology)
    chips = len(devices)
    slice_of = partitioning.slice_of_devices(exp.mesh)
    try:
        ours = flops.count(exp.family, exp.config.data.batch_size).training / chips
    except UserError:
        ours = None  # no analytic counter for this family
    whole, per_chip = _param_bytes_per_chip(exp)
    report = {
        "topology": topology, "num_slices": num_slices, "chips": chips,
        "device_kind": devices[0].device_kind,
        # what the report's ICI / DCN rows are on this hardware (a GPU host plays a slice)
        "links": ({"ICI": "NVLink", "DCN": "network"} if devices[0].platform == "gpu"
                  else {"ICI": "ICI", "DCN": "DCN"}),
        "mesh": {k: int(v) for k, v in exp.mesh.shape.items()},
        "rules": exp.config.mesh.rules, "batch_size": int(exp.config.data.batch_size),
        "remat": exp.config.model.get("remat_policy", "none"),
        "scan_layers": bool(exp.config.model.get("scan_layers", False)),
        "params": int(exp.family.num_params), "param_bytes": whole,
        "param_bytes_per_chip": per_chip,
        "chip": None if chip is None else {"name": chip.name, "hbm_bytes": chip.hbm_bytes,
                                           "source": chip.source},
        "steps": {},
    }
    if report["links"]["ICI"] == "NVLink":
        report["hosts"] = len(set(slice_of.tolist()))
    for name, (compiled, hlo, seconds, arguments) in steps.items():
        cost, memory = _cost(compiled), _memory(compiled)
        rows = collectives(hlo, slice_of)
        xla_flops = None if cost is None else float(cost.get("flops", 0.0))
        accessed = None if cost is None else float(cost.get("bytes accessed", 0.0))
        model = ours if name == "train" else None
        report["steps"][name] = {
            "compile_s": seconds, "memory": memory,
            "argument_tiling": argument_tiling(compiled, arguments),
            "fits": None if chip is None else memory["total"] <= chip.hbm_bytes,
            "xla_flops_per_chip": xla_flops, "model_flops_per_chip": model,
            "bytes_accessed_per_chip": accessed,
            "collectives": rows,
            "roofline": roofline(chip, model or xla_flops or float("nan"), accessed, rows),
        }
    report["seconds"] = time.perf_counter() - start
    train_memory = report["steps"]["train"]["memory"]
    if chip is not None and train_memory["total"] > chip.hbm_bytes:
        raise UserError(
            f"the train step needs {train_memory['total'] / 2**30:.1f} GiB per chip but a "
            f"{chip.name} has {chip.hbm_bytes / 2**30:.1f} GiB (arguments "
            f"{train_memory['arguments'] / 2**30:.1f} GiB, temporaries "
            f"{train_memory['temporaries'] / 2**30:.1f} GiB): shard weights and optimizer state "
            "over more chips (mesh.fsdp), set model.remat_policy=full, or lower "
            "data.batch_size / raise optimizer.grad_accum_steps")
    return report


def _bound_name(key: str, link: dict) -> str:
    name = key.removesuffix("_s")
    return link.get(name.upper(), name)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def format_report(r: dict) -> str:
    mesh = " x ".join(f"{k} {v}" for k, v in r["mesh"].items())
    link = r.get("links", {"ICI": "ICI", "DCN": "DCN"})
    where = (f"{r['topology']}: {r['chips']} GPUs on {r['hosts']} host(s)" if "hosts" in r
             else f"{r['topology']} x {r['num_slices']} slice(s): {r['chips']} chips")
    lines = [f"{where} ({r['device_kind']}); mesh {mesh}; rules {r['rules']}; "
             f"batch {r['batch_size']}; remat {r['remat']}",
             f"parameters {r['params'] / 1e6:.1f} M, {_gib(r['param_bytes'])}; per chip "
             f"{_gib(r['param_bytes_per_chip'])}"]
    hbm = r["chip"]["hbm_bytes"] if r["chip"] else None
    for name, s in r["steps"].items():
        m = s["memory"]
        of = f" of {_gib(hbm)} HBM ({r['chip']['source']})" if hbm else ""
        lines.append(f"[{name} step] compiled in {s['compile_s']:.0f} s")
        lines.append(f"  memory per chip: arguments {_gib(m['arguments'])}, outputs "
                     f"{_gib(m['outputs'])} (aliased {_gib(m['aliased'])}), temporaries "
                     f"{_gib(m['temporaries'])}; total {_gib(m['total'])}{of}")
        tiling = s["argument_tiling"]
        if tiling["tiled"] > 1.1 * tiling["shards"]:
            lines.append(
                f"  tile padding: the arguments' shards hold {_gib(tiling['shards'])} but take "
                f"{_gib(tiling['tiled'])} in the device's tiles (a TPU rounds a shard's two "
                "minor dimensions up to 8 x 128): a mesh axis that cuts a dimension below 128 "
                "buys less memory than its size says")
        ours = s["model_flops_per_chip"]
        xla = s["xla_flops_per_chip"]
        lines.append("  FLOPs per chip per step: XLA "
                     + ("none (this compiler gives no cost analysis)" if xla is None
                        else f"{xla:.3e}")
                     + (f", ours (model) {ours:.3e}" if ours else "")
                     + (" (XLA counts a scanned layer stack's body once)"
                        if r["scan_layers"] else ""))
        for c in s["collectives"]:
            lines.append(f"  {link[c['network']]} {c['kind']:<18} x{c['count']:<5} "
                         f"{c['bytes'] / 2**20:10.1f} MiB, sent per chip "
                         f"{c['wire_bytes'] / 2**20:10.1f} MiB")
        if not s["collectives"]:
            lines.append("  no collectives")
        rl = s["roofline"]
        if rl:
            mfu = f", MFU <= {100 * rl['mfu_bound']:.1f}%" if ours and rl["mfu_bound"] else ""
            compute, hbm_time = (("n/a" if rl[k] != rl[k] else f"{1e3 * rl[k]:.2f} ms")
                                 for k in ("compute_s", "hbm_s"))
            lines.append(
                f"  roofline: compute {compute}, HBM {hbm_time}, "
                f"{link['ICI']} {1e3 * rl['ici_s']:.2f} ms, {link['DCN']} "
                f"{1e3 * rl['dcn_s']:.2f} ms -> step >= {1e3 * rl['step_s_bound']:.2f} ms "
                f"({_bound_name(rl['bound_by'], link)}-bound; no overlap "
                f"{1e3 * rl['step_s_no_overlap']:.2f} ms){mfu}")
    return "\n".join(lines)
