"""The one training loop: K >= 1 lanes, each a trial with its own state, settings and outputs.

A lane holds one trial: its state (params, RMSprop state with its learning
rate, step, epoch, key), its dropout rates, its epoch count and its outputs
(job dir, `config.json`, checkpoints, `metrics.jsonl`, TensorBoard, `model.h5`;
a solo job's tuning metric too). One jitted program trains every lane for an
epoch on the shared data (`steps.compile_program`); lanes may be at different
epochs.
At each epoch end the loop decides every lane from the epoch's one host sync:
records; a checkpoint when due; finish a lane that has trained its epochs
(evaluate on the test set, export, free the lane); or stop it when the trial's
source asks (checkpoint, free the lane); and apply the source's perturbations
(a lane takes another's state and new settings, in one program on the device,
as population-based training asks). It then dispatches the next epoch and
leaves the writing to its background writer (`outputs`). A free lane takes
the source's next trial, with no recompilation (`lanes`).

The solo job (`python -m mnist_jax.train`) is one lane and one trial; a study
(`python -m mnist_jax.tune run --vectorize K`) is K lanes fed by the search.
Every lane keeps the solo job's guarantees: a resumed lane repeats an
uninterrupted one bit for bit; the result does not depend on the device
count; SIGTERM saves every lane and ends the loop with `Preempted`; only
process 0 writes outputs (every process takes part in Orbax saves).
"""

from __future__ import annotations

import time
from typing import Any

import jax

from mnist_jax.common.errors import MnistJaxError
from mnist_jax.common.preemption import Preempted, PreemptionGuard
from mnist_jax.common.status import Status
from mnist_jax.training import checkpoint, run, steps, writer
from mnist_jax.training.config import Config
from mnist_jax.training.lanes import Lanes, lane_tree
from mnist_jax.training.outputs import Lane, LaneOutputs
from mnist_jax.training.source import Outcome, TrialSource


class Loop:
    """One run of `train_lanes`: its setup, its lanes, its writer, and the cadence of its saves."""

    def __init__(self, base: Config, source: TrialSource, lanes: int) -> None:
        self.setup = run.build(base, lanes)
        self.source = source
        self.writer = writer.Writer()
        self.lanes = Lanes(self.setup, source, LaneOutputs(source, self.writer, self.setup.is_main, lanes == 1))
        self.cadence = checkpoint.Cadence(base.checkpoint_every)  # a solo lane's, or the group's
        self.group_epochs = 0

    def run(self, preemption: PreemptionGuard) -> None:
        program, data, bar = self.setup.program, self.setup.data, self.setup.bar
        self.lanes.fill()
        while self.lanes.held():
            started = time.perf_counter()
            self.lanes.states, train_totals = program.epoch(self.lanes.states, data.train, self.lanes.hps)
            validation_totals = program.evaluate(self.lanes.states.params, data.validation)
            # The one host sync of the epoch; Keras's epoch time likewise includes evaluation.
            train_host, validation_host = jax.device_get((train_totals, validation_totals))
            seconds = time.perf_counter() - started
            if bar is not None:
                bar.clear()
            self.writer.check()  # a write of an earlier epoch that failed stops the job here
            self.end_epoch(train_host, validation_host, seconds, preemption.requested)
            if bar is not None:
                self.writer.flush()  # the epoch's line before the next epoch's bar
            if preemption.requested:
                if self.lanes.held():
                    self.writer.flush()
                    raise Preempted(self.lanes.preempted_message(), preemption.signum)
                return  # every trial in hand is done; take no new one
            self.lanes.fill()

    def end_epoch(self, train: steps.Totals, validation: steps.Totals, seconds: float, preempted: bool) -> None:
        """Decides every lane's epoch end from the host copies of its totals, then hands the writes to the writer:
        records for every lane; a checkpoint when due; finish a lane or stop it when it is done."""
        self.group_epochs += 1
        ended: list[tuple[int, Lane, dict[str, Any]]] = []
        for k, lane in self.lanes.held():
            lane.epoch += 1
            try:
                record = steps.epoch_record(lane.epoch, lane_tree(train, k), lane_tree(validation, k), seconds)
            except MnistJaxError as e:
                self.lanes.end(k, Outcome(Status.FAILED, lane.epoch, error=str(e)))
                continue
            ended.append((k, lane, lane.record(record)))
        if not ended:
            return
        trials = [(lane.config, record) for _, lane, record in ended]
        stops = self.source.decide(trials)
        self.lanes.perturb(self.source.perturb(trials))  # before any save: a resumed lane continues after it
        self.lanes.outputs.epoch([(lane, record) for _, lane, record in ended])
        solo = self.setup.lanes == 1
        finals = sum(lane.epoch >= lane.config.epochs for _, lane, _ in ended)
        if self.source.lockstep and not solo and (preempted or finals == len(self.lanes.held())):
            self.lanes.save_group()  # before the lanes' own saves: a kill among them resumes all from one epoch
        for (k, lane, _), stop in zip(ended, stops):
            final = lane.epoch >= lane.config.epochs
            if final or stop or preempted or (solo and self.cadence.due(lane.epoch)):
                self.lanes.save(k)
                if solo:
                    self.cadence.saved()
            if final:
                self.lanes.finish(k, lane_tree(validation, k))
            elif stop and not preempted:
                self.lanes.end(k, Outcome(Status.STOPPED, lane.epoch))
        if not solo and not preempted and self.cadence.due(self.group_epochs) and self.lanes.save_group():
            self.cadence.saved()

    def close(self, *, failed: bool) -> None:
        """Finishes the writer's work and closes every lane still held; the first write failure is raised unless
        the loop is `failed` already. Once every trial in hand has its own checkpoint, the group's is removed."""
        try:
            self.writer.flush()
        except BaseException:
            if not failed:
                raise
            failed = True
        finally:
            self.lanes.close()
            self.writer.close()
        if self.lanes.group is not None and not failed:
            self.lanes.group.remove()


def train_lanes(base: Config, source: TrialSource, lanes: int) -> None:
    """Trains the source's trials, `lanes` at a time, until it has no more; `base` fixes data and shapes."""
    loop = Loop(base, source, lanes)
    with PreemptionGuard() as preemption:
        try:
            loop.run(preemption)
        except Preempted:
            loop.close(failed=False)
            raise
        except BaseException:
            loop.close(failed=True)
            raise
        loop.close(failed=False)
