"""Benchmark: mnist-jax against the seed's Keras script (Keras 3, JAX backend), one run, same data.

    python scripts/bench.py [--epochs 20] [--train-file data/mnist.pkl]

Runs each trainer as its own process on the same machine, one after the other,
and prints each one's median steady-state epoch time (epochs 2..N; epoch 1
includes compilation), their ratio, and each one's final test accuracy; then
the cost of checkpointing every epoch, against the default cadence (every 30 s and at the end). Needs
the `bench` extra (keras). Timings on a shared machine are noisy: compare the
ratio from one run, not numbers across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

# FLOPs per example: forward 2 x 668,672 multiply-adds; backward the weight gradients of all
# three layers and the input gradients of the last two (none for the images).
MACS = (784 * 512, 512 * 512, 512 * 10)
TRAIN_FLOPS_PER_EXAMPLE = 2 * sum(MACS) + 2 * sum(MACS) + 2 * sum(MACS[1:])
EVAL_FLOPS_PER_EXAMPLE = 2 * sum(MACS)

# The seed's mnist_mlp.py (Keras example), reading the same pickle, with a
# callback that records each epoch's wall time including validation.
KERAS_SCRIPT = textwrap.dedent("""
    import json, pickle, sys, time
    import keras
    from keras.layers import Dense, Dropout
    from keras.models import Sequential
    from keras.optimizers import RMSprop

    train_file, epochs, out, model_path = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    batch_size, num_classes = 128, 10
    with open(train_file, "rb") as f:
        (x_train, y_train), (x_test, y_test) = pickle.load(f)
    x_train = x_train.reshape(60000, 784).astype("float32") / 255
    x_test = x_test.reshape(10000, 784).astype("float32") / 255
    y_train = keras.utils.to_categorical(y_train, num_classes)
    y_test = keras.utils.to_categorical(y_test, num_classes)

    model = Sequential()
    model.add(keras.Input(shape=(784,)))
    model.add(Dense(512, activation="relu"))
    model.add(Dropout(0.2))
    model.add(Dense(512, activation="relu"))
    model.add(Dropout(0.2))
    model.add(Dense(num_classes, activation="softmax"))
    model.compile(loss="categorical_crossentropy", optimizer=RMSprop(), metrics=["accuracy"])

    class Timer(keras.callbacks.Callback):
        times = []
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()
        def on_epoch_end(self, epoch, logs=None):
            self.times.append(time.perf_counter() - self.start)

    model.fit(x_train, y_train, batch_size=batch_size, epochs=epochs, verbose=0,
              validation_data=(x_test, y_test), callbacks=[Timer()])
    score = model.evaluate(x_test, y_test, verbose=0)
    model.save(model_path)
    json.dump({"epoch_times": Timer.times, "test_accuracy": score[1]}, open(out, "w"))
""")


def run_measured(command: list[str], env: dict | None = None) -> tuple[float, float]:
    """Runs a command to completion; returns its wall time (s) and peak resident memory (MB)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{command} failed")
    return wall, usage.ru_maxrss / 1024


def run_keras(train_file: str, epochs: int, workdir: Path) -> dict:
    script, out = workdir / "mnist_mlp_keras.py", workdir / "keras.json"
    script.write_text(KERAS_SCRIPT)
    wall, peak = run_measured(
        [sys.executable, str(script), train_file, str(epochs), str(out), str(workdir / "keras_model.h5")],
        {"KERAS_BACKEND": "jax"},
    )
    return {**json.loads(out.read_text()), "wall_s": wall, "peak_mb": peak}


def run_ours(train_file: str, epochs: int, workdir: Path, *extra: str) -> dict:
    job_dir = workdir / f"job{len(list(workdir.glob('job*')))}"
    cache = workdir / f"{job_dir.name}-xla-cache"  # empty: compile as on a fresh machine
    wall, peak = run_measured(
        [
            sys.executable,
            "-m",
            "mnist_jax.train",
            "--train-file",
            train_file,
            "--epochs",
            str(epochs),
            "--job-dir",
            str(job_dir),
            *extra,
        ],
        {"JAX_COMPILATION_CACHE_DIR": str(cache)},
    )
    records = [json.loads(line) for line in (job_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "epoch_times": [r["epoch_time_s"] for r in records],
        "test_accuracy": records[-1]["val_accuracy"],
        "wall_s": wall,
        "peak_mb": peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--train-file", default="data/mnist.pkl")
    args = parser.parse_args()
    if not os.path.exists(args.train_file):
        subprocess.run([sys.executable, "-m", "mnist_jax.download", "--out", args.train_file], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        results = {
            "keras 3 (jax backend)": run_keras(args.train_file, args.epochs, Path(tmp)),
            "mnist-jax": run_ours(args.train_file, args.epochs, Path(tmp)),  # the default cadence, 30 s
            # Checkpointing's cost: the same job saving after every epoch.
            "mnist-jax, ckpt every epoch": run_ours(args.train_file, args.epochs, Path(tmp), "--checkpoint-every", "1"),
        }
    print(f"\n{args.epochs} epochs, {os.cpu_count()} CPU cores")
    print(
        f"{'trainer':<28}{'median epoch s':>15}{'first epoch s':>14}{'job wall s':>11}{'peak RSS MB':>12}"
        f"{'test acc':>9}{'GFLOP/s':>9}"
    )
    flops = 60000 * TRAIN_FLOPS_PER_EXAMPLE + 10000 * EVAL_FLOPS_PER_EXAMPLE
    for name, result in results.items():
        times = result["epoch_times"]
        result["median"] = statistics.median(times[1:] or times)
        print(
            f"{name:<28}{result['median']:>15.3f}{times[0]:>14.3f}{result['wall_s']:>11.1f}{result['peak_mb']:>12.0f}"
            f"{result['test_accuracy']:>9.4f}{flops / result['median'] / 1e9:>9.0f}"
        )
    keras, ours, every = results.values()
    print(
        f"mnist-jax / keras: steady-state epoch {ours['median'] / keras['median']:.3f}, "
        f"job wall time {ours['wall_s'] / keras['wall_s']:.3f}, peak memory {ours['peak_mb'] / keras['peak_mb']:.3f}"
    )
    print(f"a checkpoint every epoch costs {100 * (every['median'] / ours['median'] - 1):+.1f}% of epoch time")
    print(
        f"an epoch is {flops / 1e9:.1f} GFLOP (training {60000 * TRAIN_FLOPS_PER_EXAMPLE / 1e9:.1f}, "
        f"evaluation {10000 * EVAL_FLOPS_PER_EXAMPLE / 1e9:.1f})"
    )


if __name__ == "__main__":
    main()
