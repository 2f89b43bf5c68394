"""Everything a run needs before its first step, built once from a config.

Training, evaluation and inference all start here, so a checkpoint is always read with the
same vocabulary, family, mesh and shardings that wrote it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import jax
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding

from t5x_like import config as config_lib
from t5x_like import optim, partitioning
from t5x_like.checkpoints import Checkpoints
from t5x_like.data.vocab import get_vocabulary
from t5x_like.errors import UserError
from t5x_like.families import get_family


@dataclasses.dataclass
class Experiment:
    config: ml_collections.ConfigDict  # resolved: derived fields filled in
    vocabulary: object  # seqio.Vocabulary
    family: object
    mesh: Mesh
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    state_shardings: dict
    batch_sharding: NamedSharding

    @property
    def root_key(self) -> jax.Array:
        return jax.random.key(self.config.seed)

    def abstract_state(self) -> dict:
        """Shapes, dtypes and shardings of ``{params, opt_state, step, rng}`` (and the
        family's ``carry``, if any), no memory used."""
        shapes = jax.eval_shape(self._init_state, jax.random.key_data(self.root_key))
        return jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
            shapes,
            self.state_shardings,
        )

    def _init_state(self, rng: jax.Array) -> dict:
        params = self.family.init(jax.random.wrap_key_data(rng))
        state = {
            "params": params,
            "opt_state": self.tx.init(params),
            "step": jax.numpy.zeros((), jax.numpy.int32),
            "rng": rng,
        }
        carry = self.family.initial_carry(self.config.data.batch_size)
        return state if carry is None else {**state, "carry": carry}

    def initial_carry(self) -> dict | None:
        """The family's carry for a fresh pass over the data (evaluation), in its shardings."""
        carry = self.family.initial_carry(self.config.data.batch_size)
        if carry is None:
            return None
        return jax.device_put(carry, self.state_shardings["carry"])

    def init_state(self) -> dict:
        """Fresh state, created directly in its shardings (never whole on one device)."""
        init = jax.jit(self._init_state, out_shardings=self.state_shardings)
        return init(jax.random.key_data(self.root_key))

    def initial_state(self) -> dict:
        """``init_state``, with the pretrained weights when the family starts from a
        checkpoint (fine-tuning: ``family.load_pretrained``)."""
        state = self.init_state()
        if hasattr(self.family, "load_pretrained"):
            state["params"] = self.family.load_pretrained(state["params"],
                                                          self.state_shardings["params"])
        return state

    def saved_state(self, state: dict) -> dict:
        """What a checkpoint holds: the whole state, or the part a family says changes
        (``family.saved_state``: fine-tuning with frozen pretrained weights)."""
        cut = getattr(self.family, "saved_state", None)
        return cut(state) if cut else state

    def restore(self, checkpoints: Checkpoints, *, carry: bool = True
                ) -> tuple[dict, dict] | None:
        """(state, meta) from the newest readable checkpoint, or None; parameters a family
        does not save are taken from ``initial_state`` (the pretrained checkpoint).
        ``carry=False`` leaves the family's carry on disk (evaluation, which starts its own,
        possibly with another batch size)."""
        abstract = self.saved_state(self.abstract_state())
        if not carry:
            abstract.pop("carry", None)
        restored = checkpoints.restore_latest(abstract)
        if restored is not None and "carry" in abstract and "carry" not in restored[0]:
            restored = {**restored[0], "carry": self.initial_carry()}, restored[1]
        if restored is None or not hasattr(self.family, "saved_state"):
            return restored
        saved, meta = restored
        fresh = self.initial_state()
        return {**saved, "params": {**fresh["params"], **saved["params"]}}, meta

    def restore_or_init(self, checkpoints: Checkpoints) -> tuple[dict, dict]:
        """(state, meta) from the newest readable checkpoint, else a fresh state."""
        restored = self.restore(checkpoints)
        if restored is None:
            return self.initial_state(), {"batches_consumed": 0}
        return restored

    def write_config(self, workdir: Path) -> None:
        """Atomically (temp file + rename; one put on gs://): a kill mid-write never leaves a
        truncated config."""
        from t5x_like import storage

        storage.write_atomically(storage.as_path(workdir) / "config.json",
                                 json.dumps(self.config.to_dict(), indent=2) + "\n")


def import_task_modules(spec: str) -> list:
    """Imports ``data.task_modules`` (comma-separated module names or .py files) so the tasks
    they register exist before ``data.task`` is looked up.

    Module names are searched on sys.path, then in the current directory (the repository's
    ``tasks/`` when run from a checkout: a console script does not put it on sys.path), then
    next to the installed configs (the ``tasks/`` copy a wheel ships)."""
    import importlib
    import importlib.util

    names = [n.strip() for n in spec.split(",") if n.strip()]
    shipped = config_lib.shipped("tasks")
    for folder in (os.getcwd(), str(shipped.parent) if shipped else None):
        if names and folder and folder not in sys.path:
            sys.path.append(folder)
    modules = []
    for name in names:
        try:
            if name.endswith(".py"):
                module_spec = importlib.util.spec_from_file_location(Path(name).stem, name)
                if module_spec is None or not Path(name).is_file():
                    raise FileNotFoundError(name)
                module = importlib.util.module_from_spec(module_spec)
                module_spec.loader.exec_module(module)
            else:
                module = importlib.import_module(name)
        except UserError:
            raise
        except Exception as e:  # user code: one sentence naming the module and the cause
            raise UserError(
                f"data.task_modules names {name!r}, which failed to import "
                f"({type(e).__name__}: {e}); run from the folder that holds it or pass a .py path"
            ) from e
        modules.append(module)
    return modules


def build(config: ml_collections.ConfigDict, devices=None) -> Experiment:
    """Vocabulary -> resolved config -> family -> mesh -> optimizer -> state shardings."""
    import t5x_like.tasks  # noqa: F401  (registers the seqio tasks the config may name)

    import_task_modules(config.data.task_modules)

    vocabulary = get_vocabulary(config.data.vocab_path or None, kind=config.data.vocab_kind)
    resolved = config_lib.resolve(config, vocabulary.vocab_size)
    family = get_family(resolved, vocabulary)
    mesh = partitioning.make_mesh(resolved.mesh, devices)
    rules = partitioning.rules_from_config(resolved.mesh)
    partitioning.check_axes_used(mesh, rules)
    batch = resolved.data.batch_size
    dp = partitioning.data_parallel_size(mesh, rules)
    micro = batch // resolved.optimizer.grad_accum_steps
    if micro % dp:
        raise UserError(
            f"data.batch_size={batch} / optimizer.grad_accum_steps="
            f"{resolved.optimizer.grad_accum_steps} = {micro} examples per micro-batch cannot be "
            f"split evenly over {dp} data-parallel devices; make it a multiple of {dp}"
        )
    tx, schedule = optim.make_optimizer(resolved.optimizer, resolved.train.num_steps)
    if hasattr(family, "wrap_optimizer"):  # fine-tuning: frozen parameters get no update
        tx = family.wrap_optimizer(tx)
    specs = partitioning.param_specs(family.abstract_params, mesh, rules)
    repl = partitioning.replicated(mesh)
    abstract_params = jax.eval_shape(family.init, jax.random.key(0))
    # Moments follow their parameter; Adafactor's factored statistics keep the sharding of
    # the parameter dims they keep; counters are replicated (partitioning.opt_state_specs).
    params_sh = partitioning.named(mesh, specs)
    opt_sh = partitioning.named(mesh, partitioning.opt_state_specs(tx, abstract_params, specs,
                                                                    mesh))
    state_shardings = {"params": params_sh, "opt_state": opt_sh, "step": repl, "rng": repl}
    batch_sharding = partitioning.batch_sharding(mesh, rules)
    carry = jax.eval_shape(lambda: family.initial_carry(batch))
    if carry is not None:  # per-example state (XLNet's memory) is split as the batch is
        state_shardings["carry"] = jax.tree.map(lambda _: batch_sharding, carry)
    return Experiment(
        config=resolved,
        vocabulary=vocabulary,
        family=family,
        mesh=mesh,
        tx=tx,
        schedule=schedule,
        state_shardings=state_shardings,
        batch_sharding=batch_sharding,
    )
