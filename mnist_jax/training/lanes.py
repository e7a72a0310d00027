"""The lanes of a run: which trial each holds, their stacked states and dropout rates on the devices, how a trial
comes in (restored from its checkpoint or a lane group's copy, or fresh from its seed) and goes out (finished,
stopped, failed), and the group save of them all. What each change writes goes to `LaneOutputs`."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mnist_jax.common.errors import ConfigError, MnistJaxError
from mnist_jax.common.status import Status
from mnist_jax.training import checkpoint, parallel, steps
from mnist_jax.training.config import SHARED, Config
from mnist_jax.training.outputs import Lane, LaneOutputs, write_config
from mnist_jax.training.run import Setup
from mnist_jax.training.source import Outcome, Perturbation, TrialSource


def check_compatible(base: Config, config: Config) -> None:
    different = [key for key in SHARED if getattr(config, key) != getattr(base, key)]
    if different:
        raise ConfigError(f"trials trained together must share {', '.join(different)} (they share {', '.join(SHARED)})")


class Lanes:
    """The K lanes of one run and the trials in them."""

    def __init__(self, setup: Setup, source: TrialSource, outputs: LaneOutputs) -> None:
        self.setup, self.source, self.outputs, self.program = setup, source, outputs, setup.program
        self.slots: list[Lane | None] = [None] * setup.lanes
        self.states = self.program.blank()
        zeros = np.zeros(setup.lanes, np.float32)
        self.hps = jax.device_put(steps.Hyperparams(zeros, zeros), parallel.lanes_sharded(setup.mesh))
        # Lanes of several trials save as one group; a group's copy of a trial newer than its own
        # checkpoint (left by a run that was killed) is where the trial resumes.
        self.group = None
        if setup.lanes > 1:
            name = f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}"
            self.group = checkpoint.LaneGroup(setup.base.job_dir, name)

    def held(self) -> list[tuple[int, Lane]]:
        """The lanes that hold a trial, with their indices."""
        return [(k, lane) for k, lane in enumerate(self.slots) if lane is not None]

    def fill(self) -> None:
        """Gives every free lane the source's next trial, while there are any."""
        for k, lane in enumerate(self.slots):
            while lane is None:
                config = self.source.next_trial()
                if config is None:
                    return
                lane = self.start(k, config)

    def start(self, k: int, config: Config) -> Lane | None:
        """Puts `config`'s trial in lane k: restored from its checkpoint, or fresh from its seed; None when it
        needs no lane (it failed, or has nothing left to train)."""
        try:
            check_compatible(self.setup.base, config)
        except ConfigError as e:
            self.outputs.ended(config, Outcome(Status.FAILED, 0, error=str(e)))
            return None
        replicated = parallel.replicated(self.setup.mesh)
        state, own = checkpoint.restore_trial(config, self.setup.abstract, replicated, self.group)
        resumed, parent = state is not None, None
        if resumed:
            try:  # before any write: nothing on disk changes
                checkpoint.check_epochs(config, int(state.epoch))
            except ConfigError:
                if own is not None:
                    own.close()
                raise
        if self.setup.is_main:  # the trial's settings as it began
            write_config(config, self.setup.train_file, self.setup.lanes)
        if resumed:  # the settings in force then win over the checkpoint's rate (the same command, the same rate)
            config, parent = self.source.resumed(config, int(state.epoch))
            state = steps.set_learning_rate(state, jnp.float32(config.learning_rate))
        else:
            state = self.program.fresh(jax.random.PRNGKey(config.seed), jnp.float32(config.learning_rate))
        self.states = self.program.put(self.states, k, state)
        self.hps = self.program.put(self.hps, k, steps.hyperparams(config))
        lane = self.slots[k] = Lane(config, int(state.epoch), own, parent=parent)
        self.outputs.opened(lane)
        if resumed:
            self.outputs.say(config, f"Resuming from epoch {lane.epoch} (step {int(state.step)})")
        if lane.epoch >= config.epochs:  # nothing left to train: report the restored model
            self.finish(k, None)
            return None
        return lane

    def perturb(self, changes: Sequence[Perturbation]) -> None:
        """Applies an epoch's perturbations in one program on the device: each member lane takes its donor's
        state and its new settings (the dropout rates are values of the next epoch's program)."""
        if not changes:
            return
        lanes = self.setup.lanes
        index = {id(lane.config): k for k, lane in self.held()}
        donors, changed = np.arange(lanes, dtype=np.int32), np.zeros(lanes, bool)
        restream, streams = np.zeros(lanes, bool), np.zeros((lanes, 2), np.uint32)
        learning_rates = np.zeros(lanes, np.float32)
        for change in changes:
            k = index[id(change.member)]
            lane = self.slots[k]
            if change.donor is not None:
                donors[k], lane.parent = index[id(change.donor)], change.donor.trial_id  # type: ignore[union-attr]
            if change.stream is not None:
                restream[k], streams[k] = True, np.asarray(steps.stream(change.stream))
            changed[k], learning_rates[k] = True, change.config.learning_rate
            lane.config = change.config  # type: ignore[union-attr]
        self.states = self.program.perturb(self.states, donors, restream, streams, changed, learning_rates)
        rates = [
            [getattr(lane.config, name) if lane else 0.0 for lane in self.slots] for name in steps.Hyperparams._fields
        ]
        self.hps = jax.device_put(
            steps.Hyperparams(*np.array(rates, np.float32)), parallel.lanes_sharded(self.setup.mesh)
        )

    def save(self, k: int) -> None:
        """Lane k's trial's own checkpoint, of its state now."""
        self.outputs.save(self.slots[k], self.program.take(self.states, k))  # type: ignore[arg-type]

    def finish(self, k: int, validation: steps.Totals | None) -> None:
        """Lane k has trained its epochs: test, export `model.h5`, free the lane."""
        lane, self.slots[k] = self.slots[k], None
        params = self.program.take(self.states.params, k)
        data = self.setup.data
        test = validation  # the validation set is the test set unless a split holds some back
        if validation is None or data.test is not None:
            test = self.program.evaluate_lane(params, data.test or data.validation)
        self.outputs.finished(lane, params, test)  # type: ignore[arg-type]

    def end(self, k: int, outcome: Outcome) -> None:
        """Frees lane k of a trial that stopped or failed."""
        lane, self.slots[k] = self.slots[k], None
        self.outputs.ended(lane.config, outcome, lane)  # type: ignore[union-attr]

    def save_group(self) -> bool:
        """One save of every lane still training (a copy of the states, taken before the next epoch); False when
        no lane holds a trial."""
        held = self.held()
        if not held:
            return False
        trials = {
            checkpoint.manager_path(lane.config.checkpoint_dir): {"lane": k, "epoch": lane.epoch} for k, lane in held
        }
        shaping = checkpoint.shaping(self.setup.base)
        lanes = [lane for _, lane in held]
        self.outputs.group_saved(self.group, lanes, self.program.copy(self.states), trials, shaping)  # type: ignore[arg-type]
        return True

    def preempted_message(self) -> str:
        held = [lane for _, lane in self.held()]
        if self.setup.lanes == 1 and held:
            (lane,) = held
            return (
                f"saved epoch {lane.epoch} (step {int(self.states.step[0])}) to "
                f"{lane.config.checkpoint_dir}; rerun the same command to continue"
            )
        detail = ", ".join(f"trial {lane.config.trial_id} at epoch {lane.epoch}" for lane in held)
        return f"saved {len(held)} lanes ({detail or 'none running'}); rerun the same command to continue"

    def close(self) -> None:
        """Closes every lane still held."""
        for k, lane in self.held():
            self.slots[k] = None
            with contextlib.suppress(MnistJaxError):
                lane.close()


def lane_tree(tree: Any, k: int) -> Any:
    """Lane k's part of a host tree with a leading lane axis."""
    return jax.tree.map(lambda leaf: leaf[k], tree)
