"""The one training loop: K >= 1 lanes, each a trial with its own state, settings and outputs.

A lane holds one trial: its state (params, RMSprop state with its learning
rate, step, epoch, key), its dropout rates, its epoch count and its outputs
(job dir, `config.json`, checkpoints, `metrics.jsonl`, TensorBoard, tuning
metric, `model.h5`). One jitted program trains every lane for an epoch on the
shared data (`steps.compile_program`); lanes may be at different epochs.
At each epoch end, per lane: report; checkpoint when due; finish when the lane
has trained its epochs (evaluate on the test set, export, free the lane); or
stop when the trial's source asks (checkpoint, free the lane). A free lane
takes the source's next trial: its state is restored from the trial's own
checkpoint or created from its seed, with no recompilation.

The solo job (`python -m mnist_jax.train`) is one lane and one trial; a study
(`python -m mnist_jax.tune run --vectorize K`) is K lanes fed by the search.
Every lane keeps the solo job's guarantees: a resumed lane repeats an
uninterrupted one bit for bit; the result does not depend on the device
count; SIGTERM saves every lane and ends the loop with `Preempted` (`preemption.EXIT_STATUS`);
only process 0 writes outputs (every process takes part in Orbax saves).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from mnist_jax import checkpoint, data, download, export, metrics, parallel, steps, storage, writer
from mnist_jax.config import SHARED, Config
from mnist_jax.errors import ConfigError, MnistJaxError
from mnist_jax.log import logger
from mnist_jax.model import MLP, count_params
from mnist_jax.preemption import Preempted, PreemptionGuard
from mnist_jax.study import Status

CONFIG_FILE = "config.json"  # in each job dir: every resolved setting


class Outcome(NamedTuple):
    """How a trial left its lane."""

    status: Status  # SUCCEEDED, STOPPED or FAILED
    epochs: int  # completed epochs
    error: str | None = None  # when FAILED


class TrialSource(Protocol):
    """Where a loop's trials come from, and who hears how they go.

    `next_trial` and `decide` run on the loop's own thread, between an epoch's
    host sync and the next epoch's dispatch, so `decide` must not wait on I/O;
    `report`, `trial_done` and `say` run in order on the loop's background
    writer, while the device trains.
    """

    def next_trial(self) -> Config | None:
        """The next trial for a free lane; None when there is none (the lane stays free)."""

    def decide(self, ended: Sequence[tuple[Config, dict[str, Any]]]) -> list[bool]:
        """Which of the trials that just ended an epoch (with these records) stop here."""

    def report(self, ended: Sequence[tuple[Config, dict[str, Any]]]) -> None:
        """Hears an epoch's records, all lanes at once."""

    def trial_done(self, config: Config, outcome: Outcome) -> None:
        """Hears that a trial left its lane; its outputs are complete."""

    def say(self, config: Config, message: str) -> None:
        """Writes a line of a trial's console output (its epochs, its result) where that trial's output goes."""


def check_compatible(base: Config, config: Config) -> None:
    different = [key for key in SHARED if getattr(config, key) != getattr(base, key)]
    if different:
        raise ConfigError(f"trials trained together must share {', '.join(different)} (they share {', '.join(SHARED)})")


def write_config(config: Config, train_file: str, lanes: int) -> None:
    """Writes every resolved setting to `<job-dir>/config.json` (the first write: fails fast on a bad job dir)."""
    record = {
        **config.to_dict(),
        "train_file": train_file,
        "runtime": {
            "devices": jax.device_count(),
            "processes": jax.process_count(),
            "platform": jax.devices()[0].platform,
            "jax": jax.__version__,
            "lanes": lanes,
        },
    }
    storage.write_bytes_atomic(storage.join(config.job_dir, CONFIG_FILE), json.dumps(record, indent=2).encode())


@dataclasses.dataclass
class Lane:
    """A trial in a lane. `reporter` and `checkpointer` are used on the writer thread alone."""

    config: Config
    epoch: int  # completed epochs
    checkpointer: checkpoint.Checkpointer | None = None  # the trial's own; opened at its first save or restore
    reporter: metrics.Reporter | None = None

    def close(self) -> None:
        """Draws the final curves and closes the lane's reports and checkpoint manager."""
        try:
            if self.reporter is not None:
                self.reporter.close()
        finally:
            if self.checkpointer is not None:
                self.checkpointer.close()


def _lane(tree: Any, k: int) -> Any:
    return jax.tree.map(lambda leaf: leaf[k], tree)


class Loop:
    """The state of one run of `train_lanes`: the program, the data, the lanes."""

    def __init__(self, base: Config, source: TrialSource, lanes: int) -> None:
        self.base, self.source, self.is_main = base, source, jax.process_index() == 0
        if lanes > 1 and jax.process_count() > 1:
            raise ConfigError(
                f"--vectorize {lanes}: lanes train in one process; with {jax.process_count()} processes, "
                "run each trial as a process of its own (--vectorize 1)"
            )
        self.mesh = parallel.make_mesh(lanes)
        parallel.check_batch_size(base.batch_size, self.mesh)
        self.train_file = download.resolve_train_file(base.train_file)
        dataset = data.load(self.train_file)
        self.data = data.place(dataset, self.mesh, base.validation_split)
        del dataset  # the devices hold their copy; the host's would only raise peak memory
        if self.data.test is None:
            self.say(f"{self.data.train_examples} train samples\n{self.data.test_examples} test samples")
        else:
            self.say(
                f"{self.data.train_examples} train samples\n{self.data.validation_examples} validation samples "
                f"(the last {base.validation_split:g} of the training set)\n{self.data.test_examples} test samples"
            )
        self.model = MLP(hidden_units=base.hidden_units)
        steps_per_epoch = -(-self.data.train_examples // base.batch_size)
        solo_terminal = lanes == 1 and self.is_main and sys.stdout.isatty() and base.log_format == "text"
        self.bar = metrics.ProgressBar(steps_per_epoch) if solo_terminal else None
        self.program = steps.compile_program(
            self.model, base.batch_size, self.mesh, lanes, None if self.bar is None else self._progress
        )
        self.abstract = jax.eval_shape(self.program.fresh, jax.random.PRNGKey(0), jnp.float32(0))
        self.states = self.program.blank()
        self.hps = jax.device_put(
            steps.Hyperparams(*(np.zeros(lanes, np.float32),) * 2), parallel.lanes_sharded(self.mesh)
        )
        self.slots: list[Lane | None] = [None] * lanes
        self.writer = writer.Writer()
        self.cadence = checkpoint.Cadence(base.checkpoint_every)  # a solo lane's, or the group's
        self.group_epochs = 0
        # Lanes of several trials save as one group; a group's copy of a trial newer than its own
        # checkpoint (left by a run that was killed) is where the trial resumes.
        self.group = None
        if lanes > 1:
            name = f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}"
            self.group = checkpoint.LaneGroup(base.job_dir, name)
        self.copies = self.group.find() if self.group is not None else {}  # read again in `group_copy`
        if lanes == 1:
            self.say(metrics.model_summary(self.abstract.params, (base.dropout_one, base.dropout_two)))
        parameters = count_params(self.abstract.params)
        self.say(
            f"Training on {jax.device_count()} {jax.devices()[0].platform} device(s), "
            f"{jax.process_count()} process(es)" + (f", {lanes} lanes" if lanes > 1 else "") + f"; "
            f"{parameters:,} parameters"
        )

    def _progress(self, done: jax.Array) -> None:
        self.bar.update(int(done))  # type: ignore[union-attr]

    def say(self, message: str) -> None:
        """A line for the console; process 0 alone speaks."""
        if self.is_main:
            logger.info(message)

    def say_lane(self, config: Config, message: str) -> None:
        """A line of `config`'s trial's output, written in order on the writer."""
        if self.is_main:
            self.writer.submit(lambda: self.source.say(config, message))

    # --- lanes in and out ---------------------------------------------------

    def fill(self) -> None:
        """Gives every free lane the source's next trial, while there are any."""
        for k, lane in enumerate(self.slots):
            while lane is None:
                config = self.source.next_trial()
                if config is None:
                    return
                lane = self.start(k, config)

    def restore(self, config: Config) -> tuple[Any, checkpoint.Checkpointer | None]:
        """The trial's newest state, from its own checkpoint or a lane group's copy (None: start afresh)."""
        directory = checkpoint.manager_path(config.checkpoint_dir)
        own, state = None, None
        if storage.exists(config.checkpoint_dir):
            own = checkpoint.Checkpointer(directory, keep=config.keep_checkpoints)
            try:
                state = own.restore_latest(self.abstract, parallel.replicated(self.mesh), checkpoint.shaping(config))
            except BaseException:
                own.close()
                raise
        copy = self.group_copy(config, directory)
        if copy is not None and copy["epoch"] > (int(state.epoch) if state is not None else 0):
            state = self.group.restore_lane(copy, self.abstract, parallel.replicated(self.mesh))  # type: ignore[union-attr]
        return state, own

    def group_copy(self, config: Config, directory: str) -> dict[str, Any] | None:
        """A lane group's newest copy of the trial, if any. The groups are read again for a trial that ran before
        (it has a config.json) and that the last read missed: a trial taken over from a killed worker was saved
        by that worker's group after this loop began."""
        if self.group is None:
            return None
        if directory not in self.copies and storage.exists(storage.join(config.job_dir, CONFIG_FILE)):
            self.copies = self.group.find()
        return self.copies.get(directory)

    def start(self, k: int, config: Config) -> Lane | None:
        """Puts `config`'s trial in lane k: restored from its checkpoint, or fresh from its seed."""
        try:
            check_compatible(self.base, config)
        except ConfigError as e:
            outcome = Outcome(Status.FAILED, 0, error=str(e))
            self.writer.submit(lambda: self.source.trial_done(config, outcome))
            return None
        state, own = self.restore(config)
        resumed = state is not None
        if resumed and int(state.epoch) > config.epochs:  # before any write: nothing on disk changes
            if own is not None:
                own.close()
            raise ConfigError(
                f"{config.job_dir} holds a job trained for {int(state.epoch)} epochs, more than --epochs "
                f"{config.epochs}; use a new --job-dir, or --epochs {int(state.epoch)} or more"
            )
        if self.is_main:
            write_config(config, self.train_file, len(self.slots))
        learning_rate = jnp.float32(config.learning_rate)
        if resumed:  # the flags' rate wins over the checkpoint's (the same command: the same rate)
            opt = state.opt_state
            hyperparams = {**opt.hyperparams, "learning_rate": learning_rate}
            state = state.replace(opt_state=opt._replace(hyperparams=hyperparams))
        else:
            state = self.program.fresh(jax.random.PRNGKey(config.seed), learning_rate)
        epoch = int(state.epoch)
        self.states = self.program.put(self.states, k, state)
        self.hps = self.program.put(self.hps, k, steps.hyperparams(config))
        lane = self.slots[k] = Lane(config, epoch, own)
        if self.is_main:
            self.writer.submit(lambda: self.open_reports(lane, epoch))
        if resumed:
            self.say_lane(config, f"Resuming from epoch {epoch} (step {int(state.step)})")
        if epoch >= config.epochs:  # nothing left to train: report the restored model
            self.finish(k, None)
            return None
        return lane

    def open_reports(self, lane: Lane, epoch: int) -> None:
        """On the writer: the lane's reports, continuing the records its checkpoint covers."""
        lane.reporter = metrics.Reporter(lane.config, len(self.slots) == 1, self.writer.draw)
        lane.reporter.resume(epoch)

    def save(self, lane: Lane, state: Any, epoch: int) -> None:
        """On the writer: the trial's own checkpoint of `state`, its epoch `epoch`."""
        if lane.checkpointer is None:
            directory = checkpoint.manager_path(lane.config.checkpoint_dir)
            lane.checkpointer = checkpoint.Checkpointer(directory, keep=lane.config.keep_checkpoints)
        lane.checkpointer.save(state, checkpoint.record(lane.config, epoch))

    def finish(self, k: int, validation: steps.Totals | None) -> None:
        """Lane k has trained its epochs: test, export `model.h5`, free the lane."""
        lane = self.slots[k]
        assert lane is not None
        self.slots[k] = None
        params = self.program.take(self.states.params, k)
        test = validation  # the validation set is the test set unless a split holds some back
        if validation is None or self.data.test is not None:
            test = self.program.evaluate_lane(params, self.data.test or self.data.validation)
        self.writer.submit(lambda: self.export(lane, params, test))

    def export(self, lane: Lane, params: Any, test: steps.Totals) -> None:
        """On the writer: a finished trial's test results and `model.h5`; then its source hears of it."""
        config = lane.config
        totals = jax.device_get(test)
        lane.close()
        if self.is_main:
            self.source.say(config, f"Test loss: {float(totals.loss_sum / totals.count):.4f}")
            self.source.say(config, f"Test accuracy: {float(totals.correct / totals.count):.4f}")
            model_path = storage.join(config.model_dir, "model.h5")
            rates = (config.dropout_one, config.dropout_two)
            export.write_model(model_path, jax.device_get(params), rates, config.learning_rate)
            self.source.say(config, f"Saved {model_path}")
        self.source.trial_done(config, Outcome(Status.SUCCEEDED, lane.epoch))

    def end(self, k: int, outcome: Outcome) -> None:
        """Frees lane k of a trial that stopped or failed."""
        lane = self.slots[k]
        assert lane is not None
        self.slots[k] = None

        def done() -> None:
            lane.close()
            self.source.trial_done(lane.config, outcome)

        self.writer.submit(done)

    # --- the epochs ------------------------------------------------------------

    def run(self, preemption: PreemptionGuard) -> None:
        self.fill()
        while any(lane is not None for lane in self.slots):
            started = time.perf_counter()
            self.states, train_totals = self.program.epoch(self.states, self.data.train, self.hps)
            validation_totals = self.program.evaluate(self.states.params, self.data.validation)
            # The one host sync of the epoch; Keras's epoch time likewise includes evaluation.
            train_host, validation_host = jax.device_get((train_totals, validation_totals))
            seconds = time.perf_counter() - started
            if self.bar is not None:
                self.bar.clear()
            self.writer.check()  # a write of an earlier epoch that failed stops the job here
            self.end_epoch(train_host, validation_host, seconds, preemption.requested)
            if self.bar is not None:
                self.writer.flush()  # the epoch's line before the next epoch's bar
            if preemption.requested:
                if any(lane is not None for lane in self.slots):
                    self.writer.flush()
                    raise Preempted(self.preempted_message(), preemption.signum)
                return  # every trial in hand is done; take no new one
            self.fill()

    def end_epoch(self, train: steps.Totals, validation: steps.Totals, seconds: float, preempted: bool) -> None:
        """Decides every lane's epoch end from the host copies of its totals, then hands the writes to the writer:
        records for every lane; a checkpoint when due; finish a lane or stop it when it is done."""
        self.group_epochs += 1
        ended: list[tuple[int, Lane, dict[str, Any]]] = []
        for k, lane in enumerate(self.slots):
            if lane is None:
                continue
            lane.epoch += 1
            try:
                ended.append((k, lane, steps.epoch_record(lane.epoch, _lane(train, k), _lane(validation, k), seconds)))
            except MnistJaxError as e:
                self.end(k, Outcome(Status.FAILED, lane.epoch, error=str(e)))
        if not ended:
            return
        trials = [(lane.config, record) for _, lane, record in ended]
        stops = self.source.decide(trials)
        if self.is_main:
            self.writer.submit(lambda: self.write_records(ended))
            self.writer.submit(lambda: self.source.report(trials))
        solo = len(self.slots) == 1
        for (k, lane, _), stop in zip(ended, stops):
            final = lane.epoch >= lane.config.epochs
            if final or stop or preempted or (solo and self.cadence.due(lane.epoch)):
                state, epoch = self.program.take(self.states, k), lane.epoch
                self.writer.submit(lambda lane=lane, state=state, epoch=epoch: self.save(lane, state, epoch))
                if solo:
                    self.cadence.saved()
            if final:
                self.finish(k, _lane(validation, k))
            elif stop and not preempted:
                self.end(k, Outcome(Status.STOPPED, lane.epoch))
        if not solo and not preempted and self.cadence.due(self.group_epochs):
            self.save_group()

    def write_records(self, ended: list[tuple[int, Lane, dict[str, Any]]]) -> None:
        """On the writer: each lane's epoch line and reports."""
        for _, lane, record in ended:
            self.source.say(lane.config, metrics.epoch_line(record, lane.config.epochs))
            assert lane.reporter is not None
            lane.reporter.write(record)

    def save_group(self) -> None:
        """One save of every lane still training (a copy of the states, taken before the next epoch)."""
        held = {
            checkpoint.manager_path(lane.config.checkpoint_dir): {"lane": k, "epoch": lane.epoch}
            for k, lane in enumerate(self.slots)
            if lane is not None
        }
        if not held:
            return
        states, shaping = self.program.copy(self.states), checkpoint.shaping(self.base)
        lanes = [lane for lane in self.slots if lane is not None]

        def save() -> None:
            for lane in lanes:  # a lane resumed from this save finds its records up to it
                if lane.reporter is not None:
                    lane.reporter.persist()
            self.group.save(states, held, shaping)  # type: ignore[union-attr]

        self.writer.submit(save)
        self.cadence.saved()

    def preempted_message(self) -> str:
        saved = [lane for lane in self.slots if lane is not None]
        if len(self.slots) == 1 and saved:
            (lane,) = saved
            return (
                f"saved epoch {lane.epoch} (step {int(self.states.step[0])}) to "
                f"{lane.config.checkpoint_dir}; rerun the same command to continue"
            )
        detail = ", ".join(f"trial {lane.config.trial_id} at epoch {lane.epoch}" for lane in saved)
        return f"saved {len(saved)} lanes ({detail or 'none running'}); rerun the same command to continue"

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
            for k, lane in enumerate(self.slots):
                if lane is not None:
                    self.slots[k] = None
                    with contextlib.suppress(MnistJaxError):
                        lane.close()
            self.writer.close()
        if self.group is not None and not failed:
            self.group.remove()


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
