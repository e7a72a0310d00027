"""Checkpoints: when to save, what a checkpoint records, save and restore with Orbax, lane groups.

Owns the checkpoint directory (`<job-dir>/checkpoints` unless set; local or
gs://). Each checkpoint is keyed by the global step and holds the whole
`TrainState` (params, optimizer state with its learning rate, step, epoch,
base RNG key: everything the loop needs to continue bit-exactly) next to a
small JSON record of the settings that shaped it. The cadence is
`--checkpoint-every` (by default the first epoch end 30 s after the last
save); the last epoch, a stop and SIGTERM always save. Saves are synchronous
calls on the loop's background writer thread, so the device trains on
meanwhile; Orbax commits a step only once it is complete, so a SIGKILL
mid-save leaves an uncommitted directory that `latest_step()` ignores.

Faults lose nothing and are said in one line:
- a save that fails (no space, no permission, a storage error) raises
  `SaveError` naming the cause and the newest good checkpoint, at the next
  save or epoch-end check, so the job stops within an epoch;
- an unreadable checkpoint (truncated data, damaged metadata) is set aside as
  `<step>.unreadable` with a warning, and the newest readable one is restored;
  only when none is readable is it an error.

"""

from __future__ import annotations

import os
import re
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Sharding

from mnist_jax.common import storage
from mnist_jax.common.errors import CheckpointError, ConfigError
from mnist_jax.common.log import logger
from mnist_jax.training.config import CONFIG_FILE, LANE_GROUPS_DIR, SHAPING, Config

UNREADABLE_SUFFIX = ".unreadable"


class Cadence:
    """When a lane, or a group of lanes, saves: every N epochs (`--checkpoint-every N`), or at the first
    epoch end at least S seconds after its last save (`--checkpoint-every Ss`). The last epoch, a stop and
    SIGTERM save whatever the cadence says."""

    def __init__(self, setting: str) -> None:
        self.epochs = None if setting.endswith("s") else int(setting)
        self.seconds = float(setting[:-1]) if setting.endswith("s") else None
        self.last = time.monotonic()

    def due(self, epoch: int) -> bool:
        if self.epochs is not None:
            return epoch % self.epochs == 0
        return time.monotonic() - self.last >= self.seconds  # type: ignore[operator]

    def saved(self) -> None:
        self.last = time.monotonic()


def shaping(config: Config) -> dict[str, Any]:
    """The settings that fix a checkpoint's shapes, as this config has them."""
    return {key: getattr(config, key) for key in SHAPING}


def record(config: Config, epoch: int) -> dict[str, Any]:
    """What a checkpoint records beside the state: the settings that shaped it, all settings, the epoch."""
    return {"shaping": shaping(config), "config": config.to_dict(), "epoch": epoch}


def manager_path(directory: str) -> str:
    """`directory` as Orbax wants it: absolute when local, unchanged when a URI."""
    return os.path.abspath(directory) if storage.is_local(directory) else directory


class SaveError(CheckpointError):
    """A checkpoint could not be written; the job must stop before it loses more."""


def _cause(error: BaseException) -> str:
    """The most specific one-line reason in an exception chain (an OS error's text when there is one)."""
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    for e in chain:
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
        # Tensorstore (Orbax's array writer) ends its messages with "<reason> [os_error_code=N]".
        found = re.search(r"([A-Za-z][^:\[\]\"]*?) \[os_error_code=", str(e))
        if found:
            return found.group(1)
    text = " ".join(str(chain[-1]).split()) or type(chain[-1]).__name__
    return text[:300]


class Checkpointer:
    """An Orbax CheckpointManager with the trainer's save/restore vocabulary and fault handling.

    Saves are synchronous: the loop runs them on its background writer (`writer`), so a save that
    fails raises `SaveError` there at once, and the loop stops within an epoch.
    """

    def __init__(self, directory: str, *, keep: int | None = None, create: bool = True) -> None:
        self.directory = directory
        self._options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create, enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(directory, options=self._options)
        self._good = self._manager.latest_step()  # newest step known to be committed

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, state: Any, meta: dict[str, Any], step: int | None = None) -> None:
        """Saves `state` under `step` (default: its global step), with `meta` beside it; SaveError if it cannot."""
        step = int(jax.device_get(state.step)) if step is None else step
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        try:
            self._manager.reload()
            if step in self._manager.all_steps():
                # Committed by a process killed as this one restored (it saw none then): the same step of the
                # same command, so the same state; this save replaces it.
                self._manager.delete(step)
            self._manager.save(step, args=args, force=True)
            self._manager.wait_until_finished()
        except Exception as e:  # any failure of Orbax's writer: named, not re-raised raw
            good = f"step {self._good}" if self._good is not None else "none"
            raise SaveError(
                f"saving checkpoint step {step} to {self.directory} failed: {_cause(e)}; "
                f"the newest good checkpoint is {good} (rerun the same command, once the cause is fixed, to resume)"
            ) from None
        self._good = step

    def restore_latest(self, abstract_state: Any, sharding: Sharding, shaping: dict[str, Any]) -> Any | None:
        """The newest readable checkpoint's state on `sharding` (any device count), or None if there is none.

        `abstract_state` gives the expected structure; `shaping` holds this run's
        values of the SHAPING settings, compared with the checkpoint's before any array is
        read (a mismatch is an error, not a damaged checkpoint). Unreadable newer
        checkpoints are set aside, so the next save of their step finds room.
        """
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract_state)
        unreadable = []
        for step in reversed(self.all_steps()):
            try:
                meta = self.restore_meta(step)
                self._check_shaping(step, meta, shaping)
                state = self.restore_state(step, target)
            except CheckpointError:
                raise
            except Exception as e:  # whatever the damage, the checkpoint cannot be used
                logger.warning(f"checkpoint step {step} in {self.directory} is unreadable ({_cause(e)})")
                unreadable.append(step)
                continue
            self._set_aside(unreadable)
            self._good = step
            if unreadable:
                logger.warning(f"resuming from the newest readable checkpoint, step {step}")
            return state
        if unreadable:
            raise CheckpointError(
                f"no readable checkpoint in {self.directory} (steps {sorted(unreadable)} are damaged); "
                "move it away to start afresh"
            )
        return None

    def _check_shaping(self, step: int, meta: dict[str, Any], shaping: dict[str, Any]) -> None:
        saved = meta.get("shaping", {})
        changed = {k: (saved.get(k), v) for k, v in shaping.items() if saved.get(k) != v}
        if changed:
            detail = ", ".join(f"{k} {old} in the checkpoint vs {new} now" for k, (old, new) in changed.items())
            raise CheckpointError(
                f"checkpoint {self.directory} (step {step}) does not fit this model: {detail}; "
                "use the original settings or a new --job-dir"
            )

    def _set_aside(self, steps: list[int]) -> None:
        """Renames unreadable step directories to `<step>.unreadable` (kept for a look, ignored by Orbax)."""
        if not steps:
            return
        fs, root = storage.filesystem(self.directory)
        for step in steps:
            source = storage.join(root, str(step))
            fs.mv(source, source + UNREADABLE_SUFFIX, recursive=True)
            logger.warning(f"set aside {storage.join(self.directory, str(step))}{UNREADABLE_SUFFIX}")
        self._manager.reload()

    def restore_state(self, step: int, target: Any) -> Any:
        """The state saved at `step`, laid out as `target` (a tree of ShapeDtypeStructs with shardings)."""
        return self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state

    def restore_params(self, step: int) -> Any:
        """The params saved at `step` as host arrays, without knowing the model's shapes."""
        restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
        return jax.tree.map(np.asarray, restored.state["params"])

    def restore_meta(self, step: int) -> dict[str, Any]:
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def close(self) -> None:
        self._manager.close()


def check_epochs(config: Config, saved: int) -> None:
    """A job dir that holds more epochs than `--epochs` is refused before anything on disk changes."""
    if saved > config.epochs:
        raise ConfigError(
            f"{config.job_dir} holds a job trained for {saved} epochs, more than --epochs {config.epochs}; "
            f"use a new --job-dir, or --epochs {saved} or more"
        )


def saved_epoch(directory: str) -> int | None:
    """The epoch of the newest checkpoint in `directory`, from its record alone: None when there is none, or
    when it cannot be read (the restore then sets it aside and says why)."""
    if not storage.exists(directory):
        return None
    ckpt = Checkpointer(manager_path(directory), create=False)
    try:
        step = ckpt.latest_step()
        return None if step is None else int(ckpt.restore_meta(step)["epoch"])
    except Exception:
        return None
    finally:
        ckpt.close()


def restore_trial(
    config: Config, abstract_state: Any, sharding: Sharding, group: LaneGroup | None
) -> tuple[Any | None, Checkpointer | None]:
    """A trial's newest state, from its own checkpoint or a lane group's copy of it (None: start afresh), and its
    own checkpointer (None: it has no checkpoint yet)."""
    own, state = None, None
    if storage.exists(config.checkpoint_dir):
        own = Checkpointer(manager_path(config.checkpoint_dir), keep=config.keep_checkpoints)
        try:
            state = own.restore_latest(abstract_state, sharding, shaping(config))
        except BaseException:
            own.close()
            raise
    copy = group.copy_of(config) if group is not None else None
    if copy is not None and copy["epoch"] > (int(state.epoch) if state is not None else 0):
        state = group.restore_lane(copy, abstract_state, sharding)  # type: ignore[union-attr]
    return state, own


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


class LaneGroup:
    """The stacked states of a loop's K lanes, saved together through one Orbax manager.

    Each save is one step of the group's own directory, with a manifest naming,
    for each lane that holds a trial, the trial's checkpoint directory, its
    epoch and its lane. A trial resumes from whichever is newer: its own
    checkpoint (written when it leaves its lane) or a group's copy of its lane.
    """

    def __init__(self, job_dir: str, name: str) -> None:
        self.root = storage.join(job_dir, LANE_GROUPS_DIR)
        self.directory = manager_path(storage.join(self.root, name))
        self._checkpointer: Checkpointer | None = None
        self._saves = 0
        self._restored: dict[tuple[str, int], Any] = {}  # (directory, step) -> stacked state, read once
        self._copies: dict[str, dict[str, Any]] | None = None  # what `find` read last

    def save(self, states: Any, trials: dict[str, dict[str, int]], shaping: dict[str, Any]) -> None:
        if self._checkpointer is None:
            self._checkpointer = Checkpointer(self.directory, keep=2)
        self._saves += 1
        lanes = int(jax.tree.leaves(states)[0].shape[0])
        meta = {"lanes": lanes, "shaping": shaping, "trials": trials}
        self._checkpointer.save(states, meta, step=self._saves)

    def find(self) -> dict[str, dict[str, Any]]:
        """Every group's newest copy of each trial: {checkpoint dir: {epoch, lane, directory, step, lanes}}."""
        found: dict[str, dict[str, Any]] = {}
        fs, root = storage.filesystem(self.root)
        if not fs.isdir(root):
            return found
        for path in sorted(fs.ls(root, detail=False)):
            directory = manager_path(storage.join(self.root, path.rstrip("/").rsplit("/", 1)[-1]))
            group = Checkpointer(directory, create=False)
            try:
                step = group.latest_step()
                meta = group.restore_meta(step) if step is not None else None
            except Exception as e:  # a damaged group only costs the epochs since its trials' own checkpoints
                logger.warning(f"lane group {directory} is unreadable ({_cause(e)}); its trials use their own")
                meta = None
            finally:
                group.close()
            for trial, entry in (meta or {}).get("trials", {}).items():
                if entry["epoch"] > found.get(trial, {}).get("epoch", -1):
                    found[trial] = {**entry, "directory": directory, "step": step, "lanes": meta["lanes"]}
        return found

    def copy_of(self, config: Config) -> dict[str, Any] | None:
        """The groups' newest copy of `config`'s trial, if any. The groups are read again for a trial that ran
        before (it has a config.json) and that the last read missed: a trial taken over from a killed worker was
        saved by that worker's group after this run began."""
        directory = manager_path(config.checkpoint_dir)
        ran_before = lambda: storage.exists(storage.join(config.job_dir, CONFIG_FILE))  # noqa: E731
        if self._copies is None or (directory not in self._copies and ran_before()):
            self._copies = self.find()
        return self._copies.get(directory)

    def restore_lane(self, entry: dict[str, Any], abstract_state: Any, sharding: Sharding) -> Any:
        """Lane `entry["lane"]` of the group save `entry` names (the stacked state is read once per save)."""
        key = (entry["directory"], entry["step"])
        if key not in self._restored:
            lanes = entry["lanes"]
            target = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct((lanes, *x.shape), x.dtype, sharding=sharding), abstract_state
            )
            group = Checkpointer(entry["directory"], create=False)
            try:
                self._restored[key] = group.restore_state(entry["step"], target)
            finally:
                group.close()
        return jax.tree.map(lambda a: a[entry["lane"]], self._restored[key])

    def remove(self) -> None:
        """Deletes this group's directory, once every trial it held has saved its own checkpoint."""
        self._restored.clear()
        if self._checkpointer is not None:
            self._checkpointer.close()
            self._checkpointer = None
        fs, path = storage.filesystem(self.directory)
        if fs.exists(path):
            fs.rm(path, recursive=True)
