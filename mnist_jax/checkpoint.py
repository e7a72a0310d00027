"""Checkpoints and preemption: save, find and restore training state with Orbax.

Owns the checkpoint directory (`<job-dir>/checkpoints` unless set; local or gs://). Each checkpoint is keyed by the
global step and holds the whole `TrainState` (params, optimizer state, step,
epoch, base RNG key: everything the loop needs to continue bit-exactly) next to
a small JSON record of what shaped it. Saves are asynchronous; Orbax commits a
step only once it is complete, so a SIGKILL mid-save leaves an uncommitted
directory that `latest_step()` ignores.

SIGTERM (what cloud schedulers send before they stop a VM) only sets a flag;
the loop finishes the epoch in flight, saves, waits and exits.
"""

from __future__ import annotations

import os
import signal
import types
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Sharding

from mnist_jax import storage
from mnist_jax.errors import CheckpointError

# Settings that fix the shapes in a checkpoint: a different value cannot resume it.
SHAPING_KEYS = ("hidden_units",)


def manager_path(directory: str) -> str:
    """`directory` as Orbax wants it: absolute when local, unchanged when a URI."""
    return os.path.abspath(directory) if storage.is_local(directory) else directory


class Checkpointer:
    """An Orbax CheckpointManager with the trainer's save/restore vocabulary."""

    def __init__(self, directory: str, *, keep: int | None = None, create: bool = True) -> None:
        self.directory = directory
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
        self._manager = ocp.CheckpointManager(directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, state: Any, meta: dict[str, Any]) -> None:
        """Starts an asynchronous save of `state` under its global step."""
        step = int(jax.device_get(state.step))
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self._manager.save(step, args=args, force=True)

    def restore(self, step: int, abstract_state: Any, sharding: Sharding, shaping: dict[str, Any]) -> tuple[Any, dict]:
        """Restores the state saved at `step` onto `sharding` (any device count).

        `abstract_state` gives the expected structure; `shaping` holds this run's
        values of SHAPING_KEYS, compared with the checkpoint's before any array is read.
        """
        meta = self.restore_meta(step)
        saved = meta.get("shaping", {})
        changed = {k: (saved.get(k), v) for k, v in shaping.items() if saved.get(k) != v}
        if changed:
            detail = ", ".join(f"{k} {old} in the checkpoint vs {new} now" for k, (old, new) in changed.items())
            raise CheckpointError(
                f"checkpoint {self.directory} (step {step}) does not fit this model: {detail}; "
                "use the original settings or a new --job-dir"
            )
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract_state)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"checkpoint {self.directory} (step {step}) cannot be restored: {e}") from e
        return restored.state, meta

    def restore_params(self, step: int) -> Any:
        """The params saved at `step` as host arrays, without knowing the model's shapes."""
        restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
        return jax.tree.map(np.asarray, restored.state["params"])

    def restore_meta(self, step: int) -> dict[str, Any]:
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def close(self) -> None:
        """Waits for pending asynchronous saves to commit, then releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()


class PreemptionGuard:
    """While active, SIGTERM sets `requested` instead of killing the process."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        self.requested = True

    def __enter__(self) -> PreemptionGuard:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def load_params(directory: str, step: int | None = None) -> tuple[Any, dict[str, Any], int]:
    """Params, saved config and step of the checkpoint at `step` (default: the newest) in `directory`."""
    if storage.is_local(directory) and not os.path.isdir(directory):
        raise CheckpointError(f"no checkpoint directory at {directory}")
    ckpt = Checkpointer(manager_path(directory), create=False)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoints in {directory}")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {directory} (steps: {steps})")
        return ckpt.restore_params(step), ckpt.restore_meta(step)["config"], step
    finally:
        ckpt.close()
