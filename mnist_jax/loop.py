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

import dataclasses
import json
import sys
import time
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from mnist_jax import checkpoint, data, download, export, metrics, parallel, steps, storage
from mnist_jax.config import Config
from mnist_jax.errors import ConfigError, MnistJaxError
from mnist_jax.log import logger
from mnist_jax.model import MLP, count_params
from mnist_jax.preemption import Preempted, PreemptionGuard

# What every lane of one program must share: the data and the shapes.
SHARED = ("train_file", "batch_size", "hidden_units", "validation_split")


class Outcome(NamedTuple):
    """How a trial left its lane."""

    status: str  # SUCCEEDED, STOPPED or FAILED
    epochs: int  # completed epochs
    error: str | None = None  # when FAILED


class TrialSource(Protocol):
    """Where a loop's trials come from, and who hears how they go."""

    def next_trial(self) -> Config | None:
        """The next trial for a free lane; None when there is none (the lane stays free)."""

    def epoch_done(self, config: Config, record: dict[str, Any]) -> bool:
        """Hears a trial's epoch record; True stops the trial (it is checkpointed, then freed)."""

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
    storage.write_bytes_atomic(storage.join(config.job_dir, "config.json"), json.dumps(record, indent=2).encode())


@dataclasses.dataclass
class Lane:
    config: Config
    checkpointer: checkpoint.Checkpointer
    reporter: metrics.Reporter | None
    epoch: int  # completed epochs

    def close(self) -> None:
        """Commits the lane's saves and closes its reports (SaveError if a save failed)."""
        try:
            self.checkpointer.close()
        finally:
            if self.reporter is not None:
                self.reporter.close()


def _lane(tree: Any, k: int) -> Any:
    return jax.tree.map(lambda leaf: leaf[k], tree)


class Loop:
    """The state of one run of `train_lanes`: the program, the data, the lanes."""

    def __init__(self, base: Config, source: TrialSource, lanes: int) -> None:
        self.base, self.source, self.is_main = base, source, jax.process_index() == 0
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

    def say(self, message: str, config: Config | None = None) -> None:
        """A line for the console, or for `config`'s trial's output; process 0 alone speaks."""
        if self.is_main:
            if config is None:
                logger.info(message)
            else:
                self.source.say(config, message)

    # --- lanes in and out ---------------------------------------------------

    def fill(self) -> None:
        """Gives every free lane the source's next trial, while there are any."""
        for k, lane in enumerate(self.slots):
            while lane is None:
                config = self.source.next_trial()
                if config is None:
                    return
                lane = self.start(k, config)

    def start(self, k: int, config: Config) -> Lane | None:
        """Puts `config`'s trial in lane k: restored from its checkpoint, or fresh from its seed."""
        try:
            check_compatible(self.base, config)
        except ConfigError as e:
            self.source.trial_done(config, Outcome("FAILED", 0, error=str(e)))
            return None
        if self.is_main:
            write_config(config, self.train_file, len(self.slots))
        ckpt = checkpoint.Checkpointer(checkpoint.manager_path(config.checkpoint_dir), keep=config.keep_checkpoints)
        try:
            state = ckpt.restore_latest(self.abstract, parallel.replicated(self.mesh), checkpoint.shaping(config))
        except BaseException:
            ckpt.close()
            raise
        resumed = state is not None
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
        reporter = metrics.Reporter(config) if self.is_main else None
        if reporter is not None:
            reporter.resume(epoch)
        lane = self.slots[k] = Lane(config, ckpt, reporter, epoch)
        if resumed:
            self.say(f"Resuming from epoch {epoch} (step {int(state.step)})", config)
        if epoch >= config.epochs:  # nothing left to train: report the restored model
            self.finish(k, None)
            return None
        return lane

    def save(self, k: int) -> None:
        lane = self.slots[k]
        assert lane is not None
        lane.checkpointer.save(self.program.take(self.states, k), checkpoint.record(lane.config, lane.epoch))

    def finish(self, k: int, validation: steps.Totals | None) -> None:
        """Lane k has trained its epochs: test, export `model.h5`, free the lane."""
        lane = self.slots[k]
        assert lane is not None
        config = lane.config
        params = self.program.take(self.states.params, k)
        if validation is None or self.data.test is not None:
            validation = jax.device_get(self.program.evaluate_lane(params, self.data.test or self.data.validation))
        test_loss = float(validation.loss_sum / validation.count)
        test_accuracy = float(validation.correct / validation.count)
        self.slots[k] = None
        lane.close()
        if self.is_main:
            self.say(f"Test loss: {test_loss:.4f}", config)
            self.say(f"Test accuracy: {test_accuracy:.4f}", config)
            model_path = storage.join(config.model_dir, "model.h5")
            rates = (config.dropout_one, config.dropout_two)
            export.write_model(model_path, jax.device_get(params), rates, config.learning_rate)
            self.say(f"Saved {model_path}", config)
        self.source.trial_done(config, Outcome("SUCCEEDED", lane.epoch))

    def end(self, k: int, outcome: Outcome) -> None:
        """Frees lane k of a trial that stopped or failed."""
        lane = self.slots[k]
        assert lane is not None
        self.slots[k] = None
        lane.close()
        self.source.trial_done(lane.config, outcome)

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
            self.end_epoch(train_host, validation_host, seconds, preemption)
            if preemption.requested:
                if any(lane is not None for lane in self.slots):
                    raise Preempted(self.preempted_message())
                return  # every trial in hand is done; take no new one
            self.fill()

    def end_epoch(
        self, train: steps.Totals, validation: steps.Totals, seconds: float, preemption: PreemptionGuard
    ) -> None:
        """Per lane: report; checkpoint when due; finish it or stop it when it is done."""
        for k, lane in enumerate(self.slots):
            if lane is None:
                continue
            lane.epoch += 1
            config = lane.config
            lane.checkpointer.check()
            try:
                record = steps.epoch_record(lane.epoch, _lane(train, k), _lane(validation, k), seconds)
            except MnistJaxError as e:
                self.end(k, Outcome("FAILED", lane.epoch, error=str(e)))
                continue
            self.say(metrics.epoch_line(record, config.epochs), config)
            if lane.reporter is not None:
                lane.reporter.write(record)
            stop = self.source.epoch_done(config, record) and lane.epoch < config.epochs
            if checkpoint.checkpoint_due(config, lane.epoch) or stop or preemption.requested:
                self.save(k)
            if lane.epoch >= config.epochs:
                self.finish(k, _lane(validation, k))
            elif stop:
                self.end(k, Outcome("STOPPED", lane.epoch))

    def preempted_message(self) -> str:
        saved = [lane for lane in self.slots if lane is not None]
        if len(self.slots) == 1 and saved:
            (lane,) = saved
            return (
                f"SIGTERM: saved epoch {lane.epoch} (step {int(self.states.step[0])}) to "
                f"{lane.checkpointer.directory}; rerun the same command to continue"
            )
        detail = ", ".join(f"trial {lane.config.trial_id} at epoch {lane.epoch}" for lane in saved)
        return f"SIGTERM: saved {len(saved)} lanes ({detail or 'none running'}); rerun the same command to continue"

    def close(self, *, quiet: bool) -> None:
        """Closes every lane still held; the first save failure is raised unless `quiet` (already failing)."""
        errors = []
        for k, lane in enumerate(self.slots):
            if lane is not None:
                self.slots[k] = None
                try:
                    lane.close()
                except MnistJaxError as e:
                    errors.append(e)
        if errors and not quiet:
            raise errors[0]


def train_lanes(base: Config, source: TrialSource, lanes: int) -> None:
    """Trains the source's trials, `lanes` at a time, until it has no more; `base` fixes data and shapes."""
    loop = Loop(base, source, lanes)
    with PreemptionGuard() as preemption:
        try:
            loop.run(preemption)
        except BaseException:
            loop.close(quiet=True)
            raise
        loop.close(quiet=False)
