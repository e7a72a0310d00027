"""Where metrics go: the console (Keras-style lines), `metrics.jsonl` and the progress bar.

Only process 0 writes (the trainer checks `jax.process_index()` before it
builds the sinks). `metrics.jsonl` holds one JSON object per epoch; it is kept
in memory and rewritten atomically after each epoch, so a crash never leaves a
torn line and a resumed job drops epochs its checkpoint does not cover.
"""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

from mnist_jax import storage

EPOCH_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy")


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
    return "\n".join([
        'Model: "sequential"', line, f" {'Layer (type)':<40}{'Output Shape':<22}{'Param #':>14}", thick,
        *body, thick, f"Total params: {total:,}", f"Trainable params: {total:,}", "Non-trainable params: 0", line,
    ])


def epoch_line(record: dict[str, Any], epochs: int) -> str:
    """`Epoch 3/20 - 1.1s - loss: 0.0775 - accuracy: 0.9766 - val_loss: ... - val_accuracy: ...`"""
    parts = [f"Epoch {record['epoch']}/{epochs}", f"{record['epoch_time_s']:.1f}s"]
    parts += [f"{key}: {record[key]:.4f}" for key in EPOCH_KEYS]
    return " - ".join(parts)


class ProgressBar:
    """A Keras-like in-epoch progress bar, drawn only when the stream is a terminal."""

    def __init__(self, steps: int, stream: TextIO = sys.stdout, width: int = 30) -> None:
        self.steps, self.stream, self.width = steps, stream, width

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

    def resume(self, completed_epochs: int) -> None:
        """Loads earlier records up to `completed_epochs` (what the checkpoint covers)."""
        if completed_epochs == 0 or not storage.exists(self.path):
            self.records = []
            return
        lines = storage.read_bytes(self.path).decode().splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
        self.records = [r for r in records if r["epoch"] <= completed_epochs]

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        text = "".join(json.dumps(r) + "\n" for r in self.records)
        storage.write_bytes_atomic(self.path, text.encode())
