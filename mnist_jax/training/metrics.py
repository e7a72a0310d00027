"""Where metrics go: the console (Keras-style lines and progress bar), `metrics.jsonl`,
TensorBoard events, `curves.png` and the solo job's tuning metric, all fed at once by `Reporter.write`.

Only process 0 reports (the trainer builds a `Reporter` there alone), on the
loop's background writer. `metrics.jsonl` holds one JSON object per epoch; it
is kept in memory and rewritten atomically (after each epoch for the solo job;
for a study's lane, before each save of its group and at its end), so a crash
never leaves a torn line and a resumed job drops epochs its checkpoint does not
cover. `curves.png` (`curves`) is drawn when the job ends and, for the solo
job, at most every `REDRAW_S` while it trains, on the writer's drawing thread.

Files we write are written atomically; TensorBoard's event file is appended
by tensorboardX, and cloudml-hypertune rewrites its metric file in place.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from mnist_jax.common import storage
from mnist_jax.common.errors import StorageError
from mnist_jax.training.config import HPARAMS, Config
from mnist_jax.training.curves import curves_png

EPOCH_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy")
FLUSH_S = 5  # TensorBoard's events reach the file at the first epoch, then at the first epoch this long after
REDRAW_S = 5  # the solo job's curves.png is redrawn at most this often


def model_summary(params: Any, dropout_rates: tuple[float, float]) -> str:
    """A Keras-style table of the layers, their output shapes and parameter counts."""
    rows, total = [], 0
    dense_names = ["dense", "dense_1", "dense_2"]
    for i, name in enumerate(dense_names):
        kernel, bias = params[name]["kernel"], params[name]["bias"]
        count = kernel.size + bias.size
        total += count
        rows.append((f"{name} (Dense)", f"(None, {kernel.shape[1]})", f"{count:,}"))
        if i < len(dropout_rates):
            suffix = f"_{i}" if i else ""
            rows.append((f"dropout{suffix} (Dropout, rate {dropout_rates[i]:g})", f"(None, {kernel.shape[1]})", "0"))
    line, thick = "_" * 78, "=" * 78
    body = [f" {a:<40}{b:<22}{c:>14}" for a, b, c in rows]
    return "\n".join(
        [
            'Model: "sequential"',
            line,
            f" {'Layer (type)':<40}{'Output Shape':<22}{'Param #':>14}",
            thick,
            *body,
            thick,
            f"Total params: {total:,}",
            f"Trainable params: {total:,}",
            "Non-trainable params: 0",
            line,
        ]
    )


def epoch_line(record: dict[str, Any], epochs: int) -> str:
    """`Epoch 3/20 - 1.1s - loss: 0.0775 - accuracy: 0.9766 - val_loss: ... - val_accuracy: ...`"""
    parts = [f"Epoch {record['epoch']}/{epochs}", f"{record['epoch_time_s']:.1f}s"]
    parts += [f"{key}: {record[key]:.4f}" for key in EPOCH_KEYS]
    return " - ".join(parts)


class ProgressBar:
    """A Keras-like in-epoch progress bar, drawn only when the stream is a terminal."""

    def __init__(self, steps: int, stream: TextIO | None = None, width: int = 30) -> None:
        # sys.stdout as it is when the bar is made (a redirected one too, as the logger honours it), not at import
        self.steps, self.stream, self.width = steps, stream if stream is not None else sys.stdout, width

    def update(self, done: int) -> None:
        filled = self.width * done // self.steps
        bar = "=" * filled + (">" if filled < self.width else "") + "." * max(self.width - filled - 1, 0)
        self.stream.write(f"\r{done:>{len(str(self.steps))}}/{self.steps} [{bar}]")
        self.stream.flush()

    def clear(self) -> None:
        self.stream.write("\r" + " " * (2 * len(str(self.steps)) + self.width + 4) + "\r")
        self.stream.flush()


class MetricsLog:
    """The epoch records of one job, mirrored to `<job-dir>/metrics.jsonl`."""

    def __init__(self, job_dir: str) -> None:
        self.path = storage.join(job_dir, "metrics.jsonl")
        self.records: list[dict[str, Any]] = []
        self.written = 0  # how many records the file holds

    def resume(self, completed_epochs: int) -> None:
        """Loads earlier records up to `completed_epochs` (what the checkpoint covers)."""
        if completed_epochs == 0 or not storage.exists(self.path):
            self.records = []
            return
        lines = storage.read_bytes(self.path).decode().splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
        self.records = [r for r in records if r["epoch"] <= completed_epochs]
        self.written = len(self.records)

    def write(self) -> None:
        """Rewrites the file with every record, if it lacks any."""
        if self.written < len(self.records):
            text = "".join(json.dumps(r) + "\n" for r in self.records)
            storage.write_bytes_atomic(self.path, text.encode())
            self.written = len(self.records)


class TensorBoardLog:
    """Per-epoch scalars and the run's hyperparameters as TensorBoard events (tensorboardX: no TensorFlow).

    Events are written on the caller's thread through tensorboardX's event file writer: its `SummaryWriter`
    would add two threads (a writer and a queue's feeder) for each trial, 128 for a study of 64 lanes. They
    reach the file at the first epoch, at the first epoch `FLUSH_S` after the last flush, and at `close`.
    """

    def __init__(self, log_dir: str, hparams: dict[str, Any]) -> None:
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary
        from tensorboardX.record_writer import directory_check
        from tensorboardX.summary import hparams as hparams_summaries

        self._event, self._summary, self._dir = Event, Summary, log_dir
        directory_check(log_dir)
        self._events = EventsWriter(storage.join(log_dir, "events"))
        for summary in hparams_summaries(hparams, {"accuracy/validation": 0.0}):
            self._add(summary)
        self._flushed = -math.inf

    def _add(self, summary: Any, step: int | None = None) -> None:
        event = self._event(summary=summary, wall_time=time.time())
        if step is not None:
            event.step = step
        self._guarded(lambda: self._events.write_event(event))

    def _guarded(self, write: Callable[[], object]) -> None:
        """A write of the event file; a failure, whatever tensorboardX's file or gs:// writer raises, is one line."""
        try:
            write()
        except Exception as e:
            detail = " ".join(str(e).split())[:300] or type(e).__name__
            raise StorageError(f"writing TensorBoard events to {self._dir} failed: {detail}") from None

    def write(self, record: dict[str, Any]) -> None:
        scalars = {f"{name}/train": record[name] for name in ("loss", "accuracy")}
        scalars |= {f"{name}/validation": record[f"val_{name}"] for name in ("loss", "accuracy")}
        scalars["learning_rate"] = record["learning_rate"]  # the one in force during the epoch
        scalars["epoch_time_s"] = record["epoch_time_s"]
        values = [self._summary.Value(tag=tag, simple_value=float(value)) for tag, value in scalars.items()]
        self._add(self._summary(value=values), record["epoch"])
        if time.monotonic() - self._flushed >= FLUSH_S:
            self._guarded(self._events.flush)
            self._flushed = time.monotonic()

    def close(self) -> None:
        self._guarded(self._events.close)


class Tuning:
    """The tuning metric (validation accuracy) in cloudml-hypertune's file, where a tuning service reads it."""

    def __init__(self, config: Config) -> None:
        import hypertune

        # cloudml-hypertune takes its file and trial from the environment; the config already read
        # them (per trial when several train in one process), so they are set here.
        self._hypertune = hypertune.HyperTune()
        self._hypertune.metric_path = config.hpt_metric_file
        self._hypertune.trial_id = config.trial_id or "0"
        os.makedirs(os.path.dirname(os.path.abspath(config.hpt_metric_file)), exist_ok=True)
        self._tag = config.hpt_metric_tag

    def report(self, record: dict[str, Any]) -> None:
        self._hypertune.report_hyperparameter_tuning_metric(
            hyperparameter_metric_tag=self._tag, metric_value=record["val_accuracy"], global_step=record["epoch"]
        )


class Reporter:
    """Every sink of one job's epoch records: metrics.jsonl, TensorBoard, curves.png and the
    hyperparameter-tuning metric (validation accuracy, in the cloudml-hypertune format).

    `live`: metrics.jsonl is rewritten after every epoch, curves.png at most every REDRAW_S, and the tuning
    metric goes to its file; else (a lane of a study, whose metric goes to the study's storage alone)
    metrics.jsonl and curves.png are written at the end, and metrics.jsonl whenever `persist` is called (before
    each save of the lane's group, which a resumed lane's records must reach).
    """

    def __init__(self, config: Config, live: bool, draw: Callable[[Callable[[], None]], None]) -> None:
        self.log = MetricsLog(config.job_dir)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        hparams = {key: getattr(config, key) for key in HPARAMS}  # the settings declared hparam
        self.tensorboard = TensorBoardLog(storage.join(config.tensorboard_dir, stamp), hparams)
        self.curves_path = storage.join(config.job_dir, "curves.png")
        self.tuning = Tuning(config) if live else None  # a lane's metric goes to its study's storage alone
        self.live, self.drawn, self._draw = live, time.monotonic(), draw

    def resume(self, completed_epochs: int) -> None:
        self.log.resume(completed_epochs)

    def write(self, record: dict[str, Any]) -> None:
        self.log.records.append(record)
        if self.live:
            self.log.write()
        self.tensorboard.write(record)
        if self.tuning is not None:
            self.tuning.report(record)
        if self.live and time.monotonic() - self.drawn >= REDRAW_S:
            self.draw()

    def persist(self) -> None:
        self.log.write()

    def draw(self) -> None:
        """Hands a drawing of the records so far to `draw` (the loop's drawing thread)."""
        path, records = self.curves_path, list(self.log.records)
        self._draw(lambda: storage.write_bytes_atomic(path, curves_png(records)))
        self.drawn = time.monotonic()

    def close(self) -> None:
        """Writes the final records and curves; closes TensorBoard's file."""
        try:
            self.log.write()
            if self.log.records:
                self.draw()
        finally:
            self.tensorboard.close()
