"""orbax checkpoints of a run: train state + where the data stream stood + the resolved config.

Layout: ``WORKDIR/checkpoints/<step>/{state,meta}``. ``state`` is the pytree
``{params, opt_state, step, rng}`` saved sharded (each host writes its shards, restore places
them on whatever mesh the abstract state asks for); ``meta`` is JSON. Saves are asynchronous
and atomic (orbax writes a temporary directory and renames it when complete), so an
interrupted save is never mistaken for a checkpoint. Nothing is ever unpickled.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from t5x_like.errors import UserError


class Checkpoints:
    """A CheckpointManager that keeps the newest N and falls back past unreadable steps."""

    def __init__(self, workdir: str | Path, *, keep: int = 3, read_only: bool = False):
        self.directory = Path(workdir).absolute() / "checkpoints"
        if read_only and not self.directory.is_dir():
            raise UserError(
                f"{Path(workdir)} holds no checkpoints/ folder: is it a t5x-like workdir?"
            )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=not read_only, read_only=read_only
            ),
            item_names=("state", "meta"),
        )
        self.unreadable: set[int] = set()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Starts an asynchronous save; training continues while it is written.

        A step that exists but was unreadable at restore is moved aside (never deleted) first.
        """
        if step in self.unreadable:
            aside = self.directory / f"unreadable-{step}-{int(time.time())}"
            (self.directory / str(step)).rename(aside)
            print(f"note: moved unreadable checkpoint step {step} to {aside}", flush=True)
            self.unreadable.discard(step)
            self.manager.reload()
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict] | None:
        """The newest readable (state, meta), or None when there is none.

        A step that fails to restore (truncated files, flipped bytes, missing metadata) is
        reported and skipped in favour of the one before it; its files are left untouched.
        """
        for step in reversed(self.steps()):
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        meta=ocp.args.JsonRestore(),
                    ),
                )
            except Exception as e:  # orbax/tensorstore raise many types for damaged files
                reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
                print(
                    f"warning: checkpoint step {step} in {self.directory} is unreadable "
                    f"({type(e).__name__}: {reason}); falling back to an earlier step",
                    flush=True,
                )
                self.unreadable.add(step)
                continue
            return restored["state"], dict(restored["meta"])
        return None

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
