"""What a lane writes, queued in order on the run's writer thread: its reports (console lines, `metrics.jsonl`,
TensorBoard, a solo job's tuning metric, `curves.png`), its checkpoints, a finished trial's test results and
`model.h5`, and the group save of every lane; then its trial source hears of it.

The loop's thread decides and dispatches; every method here only queues a write (`Writer.submit`), so nothing
here waits on I/O while the device could train. Only process 0 reports and exports; every process takes part
in checkpoint saves.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import jax

from mnist_jax.common import storage
from mnist_jax.common.status import Status
from mnist_jax.model import keras_h5
from mnist_jax.training import checkpoint, metrics, steps
from mnist_jax.training.config import CONFIG_FILE, PERTURBABLE, Config
from mnist_jax.training.source import Outcome, TrialSource
from mnist_jax.training.writer import Writer


@dataclasses.dataclass
class Lane:
    """A trial in a lane. `reporter` and `checkpointer` are used on the writer thread alone."""

    config: Config
    epoch: int  # completed epochs
    checkpointer: checkpoint.Checkpointer | None = None  # the trial's own; opened at its first save or restore
    reporter: metrics.Reporter | None = None
    parent: str | None = None  # the trial whose state the lane took before its next epoch

    def record(self, record: dict[str, Any]) -> dict[str, Any]:
        """An epoch's record with the settings in force during it, and the trial it took its state from."""
        record.update({name: getattr(self.config, name) for name in PERTURBABLE})
        if self.parent is not None:
            record["parent"], self.parent = int(self.parent), None
        return record

    def close(self) -> None:
        """Draws the final curves and closes the lane's reports and checkpoint manager."""
        try:
            if self.reporter is not None:
                self.reporter.close()
        finally:
            if self.checkpointer is not None:
                self.checkpointer.close()


def write_config(config: Config, train_file: str, lanes: int) -> None:
    """Writes every resolved setting to `<job-dir>/config.json` (a trial's first write: fails fast on a bad
    job dir)."""
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


class LaneOutputs:
    """Queues each lane's writes on `writer`. `live`: a solo job, whose metrics.jsonl and curves follow every
    epoch (a study's lanes write theirs at their group's saves and their end)."""

    def __init__(self, source: TrialSource, writer: Writer, is_main: bool, live: bool) -> None:
        self.source, self.writer, self.is_main, self.live = source, writer, is_main, live

    def say(self, config: Config, message: str) -> None:
        """A line of `config`'s trial's output."""
        if self.is_main:
            self.writer.submit(lambda: self.source.say(config, message))

    def opened(self, lane: Lane) -> None:
        """The lane's reports, continuing the records its checkpoint covers."""
        if self.is_main:
            config, epoch = lane.config, lane.epoch  # as they are now: a perturbation may change the lane's

            def open_reports() -> None:
                lane.reporter = metrics.Reporter(config, self.live, self.writer.draw)
                lane.reporter.resume(epoch)

            self.writer.submit(open_reports)

    def epoch(self, ended: Sequence[tuple[Lane, dict[str, Any]]]) -> None:
        """An epoch's records: each lane's line and reports, then the source hears them all at once."""
        if not self.is_main:
            return
        trials = [(lane.config, record) for lane, record in ended]

        def write() -> None:
            for lane, record in ended:
                self.source.say(lane.config, metrics.epoch_line(record, lane.config.epochs))
                lane.reporter.write(record)  # type: ignore[union-attr]
            self.source.report(trials)

        self.writer.submit(write)

    def save(self, lane: Lane, state: Any) -> None:
        """The trial's own checkpoint of `state` (a copy taken before the next epoch), at its epoch now."""
        config, epoch = lane.config, lane.epoch

        def save() -> None:
            if lane.checkpointer is None:
                directory = checkpoint.manager_path(config.checkpoint_dir)
                lane.checkpointer = checkpoint.Checkpointer(directory, keep=config.keep_checkpoints)
            # A host copy: a lane's state is small and replicated, and Orbax saves host arrays faster (42
            # against 57 ms for the tiny study's lane state, where 64 trials save as they finish together).
            lane.checkpointer.save(jax.device_get(state), checkpoint.record(config, epoch))

        self.writer.submit(save)

    def finished(self, lane: Lane, params: Any, test: steps.Totals) -> None:
        """A trial that trained its epochs: its test results and `model.h5`; then its source hears of it."""

        def export() -> None:
            config, totals = lane.config, jax.device_get(test)
            lane.close()
            if self.is_main:
                self.source.say(config, f"Test loss: {float(totals.loss_sum / totals.count):.4f}")
                self.source.say(config, f"Test accuracy: {float(totals.correct / totals.count):.4f}")
                model_path = storage.join(config.model_dir, "model.h5")
                rates = (config.dropout_one, config.dropout_two)
                keras_h5.write_model(model_path, jax.device_get(params), rates, config.learning_rate)
                self.source.say(config, f"Saved {model_path}")
            self.source.trial_done(config, Outcome(Status.SUCCEEDED, lane.epoch))

        self.writer.submit(export)

    def ended(self, config: Config, outcome: Outcome, lane: Lane | None = None) -> None:
        """A trial that stopped or failed (in its lane, or before it got one); its source hears of it."""

        def done() -> None:
            if lane is not None:
                lane.close()
            self.source.trial_done(config, outcome)

        self.writer.submit(done)

    def group_saved(
        self,
        group: checkpoint.LaneGroup,
        lanes: Sequence[Lane],
        states: Any,
        held: dict[str, dict[str, int]],
        shaping: dict[str, Any],
    ) -> None:
        """One save of the lanes' stacked `states`, `held` naming each trial's lane and epoch in it."""

        def save() -> None:
            for lane in lanes:  # a lane resumed from this save finds its records up to it
                if lane.reporter is not None:
                    lane.reporter.persist()
            group.save(states, held, shaping)

        self.writer.submit(save)
