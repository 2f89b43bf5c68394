"""orbax checkpoints of a run: train state + where the data stream stood + the resolved config.

Layout: ``WORKDIR/checkpoints/<step>/{state,meta[,carry]}``. ``state`` is the pytree
``{params, opt_state, step, rng}`` saved sharded (each host writes its shards, restore places
them on whatever mesh the abstract state asks for); ``meta`` is JSON (batches consumed, the
config). A family's per-example ``carry`` (XLNet's memory) is an item of its own, so
evaluation, which starts its own carry with any batch size, never reads it. Nothing is ever
unpickled.

Crash safety. orbax writes a step into ``<step>.orbax-checkpoint-tmp-<time>/`` (state and meta
together) and renames it to ``<step>/`` only when every file is written, so the data position
in ``meta`` is committed atomically with the state it belongs to, and a process killed at any
moment (SIGKILL mid-save included) leaves complete steps plus at most one temporary folder.
On gs:// (no atomic rename) orbax writes ``<step>/`` in place and puts ``commit_success.txt``
last; a step folder without it is the leftover. Such leftovers are reported and removed when
a run opens the folder. orbax checksums only its
index, not the (zstd-compressed) array data, so a flipped byte can restore silently as a wrong
number: ``meta`` therefore also holds a fingerprint of every array (two wrapping sums of its
bits, computed on device), checked after each restore. Steps that do not restore or do not
match (truncated files, flipped bytes, deleted metadata) are reported, moved aside when
training (never deleted) and skipped in favour of the step before. A save that fails (full
disk, unwritable folder) stops the run with a message while the previous step stays intact.
"""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from t5x_like import storage
from t5x_like.errors import UserError

TMP_MARKER = ".orbax-checkpoint-tmp"  # orbax's suffix for a step that is still being written
# On gs:// orbax writes a step in place and adds this file last (no atomic rename there).
COMMIT_FILE = "commit_success.txt"


def _say(text: str) -> None:
    if jax.process_index() == 0:
        print(text, flush=True)


def _reason(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def check_writable(workdir: str | Path) -> None:
    """UserError unless ``workdir`` can be created and takes a small write, fsynced and removed.

    Runs before anything is built or compiled, so a read-only or missing mount (or a missing
    bucket, or no permission on it, for gs://) fails in one sentence instead of at the first
    checkpoint an hour later.
    """
    workdir = storage.as_path(workdir)
    try:
        storage.probe_write(workdir, f".write-test-{uuid.uuid4().hex[:8]}",
                            b"t5x-like write test\n" * 64)
    except Exception as e:  # OSError locally; gcsfs/s3fs raise their own types too
        if not storage.is_remote(workdir) and not isinstance(e, OSError):
            raise
        raise UserError(
            f"workdir {workdir} is not writable ({_reason(e)}); choose another --workdir or fix "
            f"its permissions and free space"
        ) from e


def check_free_space(workdir: str | Path, checkpoint_bytes: int) -> None:
    """UserError when the workdir's disk cannot hold one more checkpoint of this size.

    Object storage has no free space to ask for: a quota surfaces as a failed save, which
    names its step and keeps the one before.
    """
    if storage.is_remote(workdir):
        return
    free = shutil.disk_usage(workdir).free
    if free < checkpoint_bytes:
        raise UserError(
            f"the disk of {workdir} has {free / 2**20:.1f} MiB free but one checkpoint of this "
            f"model needs about {checkpoint_bytes / 2**20:.1f} MiB; free space or choose "
            f"another --workdir"
        )


def _leaf_sums(x: jax.Array) -> jax.Array:
    """Two wrapping uint32 sums of ``x``'s bits: plain, and weighted by odd position numbers
    (so swapped or shifted words change it too)."""
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32).ravel()
    weights = jnp.arange(bits.size, dtype=jnp.uint32) * 2 + 1
    return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weights, dtype=jnp.uint32)])


@jax.jit
def _all_sums(leaves: list) -> list:
    return [_leaf_sums(x) for x in leaves]


def fingerprint(state: Any) -> dict[str, list[int]]:
    """{leaf path: [sum, weighted sum]} of a state pytree, computed where the arrays live."""
    paths, leaves = zip(*jax.tree_util.tree_leaves_with_path(state), strict=True)
    sums = _all_sums(list(leaves))
    if jax.process_count() > 1:  # replicated results: this host's copy is the whole value
        sums = [x.addressable_data(0) for x in sums]
    return {
        jax.tree_util.keystr(path): [int(v) for v in np.asarray(s)]
        for path, s in zip(paths, sums, strict=True)
    }


def _split_carry(state: Any) -> tuple[Any, Any]:
    """(state without its ``carry``, the carry or None): the carry is saved as its own item."""
    if isinstance(state, dict) and "carry" in state:
        return {k: v for k, v in state.items() if k != "carry"}, state["carry"]
    return state, None


def _check_fingerprint(state: Any, meta: dict) -> None:
    expected = meta.get("fingerprint")
    if not expected:  # written before fingerprints existed
        return
    if not (isinstance(state, dict) and "carry" in state):  # a carry left on disk
        expected = {k: v for k, v in expected.items() if not k.startswith("['carry']")}
    actual = fingerprint(state)
    bad = [k for k in expected if actual.get(k) != expected[k]]
    if bad or set(actual) != set(expected):
        raise ValueError(
            f"the restored arrays do not match the fingerprint saved with them "
            f"({len(bad)} differ, e.g. {bad[:1]}): files were changed after they were written"
        )


class Checkpoints:
    """A CheckpointManager that keeps the newest N and falls back past unreadable steps."""

    def __init__(self, workdir: str | Path, *, keep: int = 3, read_only: bool = False):
        self.directory = storage.absolute(workdir) / "checkpoints"
        self.read_only = read_only
        if read_only and not self.directory.is_dir():
            raise UserError(
                f"{workdir} holds no checkpoints/ folder: is it a t5x-like workdir?"
            )
        self.incomplete = self._report_incomplete()
        try:
            self.manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=keep,
                    create=not read_only,
                    read_only=read_only,
                    cleanup_tmp_directories=not read_only,
                ),
                item_names=("state", "meta", "carry"),
            )
        except OSError as e:
            raise UserError(
                f"cannot open the checkpoint folder {self.directory} ({_reason(e)}); check that "
                f"the workdir is writable"
            ) from e
        self.unreadable: set[int] = set()
        self.pending: int | None = None  # the step whose asynchronous save may still run
        self.last_saved: int | None = None  # the newest step known to be complete on disk

    def _report_incomplete(self) -> list[str]:
        """Names of temporary step folders a killed save left behind (removed by orbax)."""
        if not self.directory.is_dir():
            return []
        if storage.is_remote(self.directory):  # a step folder that lacks its commit file
            names = sorted(p.name for p in self.directory.iterdir()
                           if p.name.isdigit() and not (p / COMMIT_FILE).exists())
        else:
            names = sorted(p.name for p in self.directory.iterdir() if TMP_MARKER in p.name)
        for name in names:
            action = "ignoring it" if self.read_only else "removing it"
            _say(
                f"warning: checkpoint {self.directory / name} is incomplete (a save that never "
                f"finished, e.g. the process was killed while writing); {action}"
            )
        return names

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Starts an asynchronous save; training continues while it is written.

        The previous save is awaited first, so its failure is reported here, naming its step.
        A step that exists but was unreadable at restore is moved aside (never deleted) first.
        """
        self.wait()
        if step in self.unreadable:
            self._move_aside(step)
        meta = {**meta, "fingerprint": fingerprint(state)}
        state, carry = _split_carry(state)
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if carry is not None:
            items["carry"] = ocp.args.StandardSave(carry)
        try:
            started = self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:  # OSError, tensorstore and orbax errors alike
            raise self._save_error(step, e) from e
        if not started:
            raise UserError(f"orbax declined to save checkpoint step {step} in {self.directory}")
        self.pending = step

    def wait(self) -> None:
        """Blocks until the pending save is complete; a failed one becomes a UserError."""
        if self.pending is None:
            return
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as e:
            step, self.pending = self.pending, None
            raise self._save_error(step, e) from e
        self.last_saved, self.pending = self.pending, None

    def _save_error(self, step: int, e: BaseException) -> UserError:
        before = [s for s in self.steps() if s < step]
        if self.last_saved is not None or before:
            kept = f"checkpoint step {max([*before, self.last_saved or 0])} is intact"
        else:
            kept = "no earlier checkpoint exists"
        return UserError(
            f"saving checkpoint step {step} in {self.directory} failed ({_reason(e)}); {kept}: "
            f"free disk space or fix the folder, then run the same command to resume"
        )

    def _move_aside(self, step: int) -> None:
        aside = self.directory / f"unreadable-{step}-{int(time.time())}"
        if jax.process_index() == 0:
            (self.directory / str(step)).rename(aside)
            _say(f"note: moved unreadable checkpoint step {step} to {aside}")
        if jax.process_count() > 1:  # the others reload only after process 0 renamed it
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"t5x_like_move_aside_{step}")
        self.unreadable.discard(step)
        self.manager.reload()

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict] | None:
        """The newest readable (state, meta), or None when there is none (a state whose
        ``carry`` no longer fits comes back without it).

        A step that fails to restore (truncated files, flipped bytes, missing metadata) is
        reported and skipped in favour of the one before it. A writable manager moves it aside
        at once (orbax would otherwise refuse to save any step below it); a read-only one
        leaves its files untouched.
        """
        abstract_state, abstract_carry = _split_carry(abstract_state)
        items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
        if abstract_carry is not None:
            items["carry"] = ocp.args.StandardRestore(abstract_carry)
        for step in reversed(self.steps()):
            try:
                restored = self._restore(step, items)
                state = restored["state"]
                if "carry" in restored:
                    state = {**state, "carry": restored["carry"]}
                _check_fingerprint(state, restored["meta"])
            except Exception as e:  # orbax/tensorstore raise many types for damaged files
                _say(
                    f"warning: checkpoint step {step} in {self.directory} is unreadable "
                    f"({_reason(e)}); falling back to an earlier step"
                )
                self.unreadable.add(step)
                if not self.read_only:
                    self._move_aside(step)
                continue
            self.last_saved = step
            meta = {k: v for k, v in restored["meta"].items() if k != "fingerprint"}
            return state, meta
        return None

    def _restore(self, step: int, items: dict) -> dict:
        """The items of one step; a carry that no longer fits (the batch size changed) is
        left out with a note, since the state without it is still good."""
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:
            if "carry" not in items:
                raise
            items = {k: v for k, v in items.items() if k != "carry"}
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
            _say(f"note: the carry saved with checkpoint step {step} (per-example state such "
                 f"as XLNet's memory) does not fit this run's batch or is damaged "
                 f"({_reason(e)}); it starts from zeros")
            return restored

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()
