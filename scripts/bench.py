"""Benchmark: mnist-jax against the seed's Keras script (Keras 3, JAX backend), one run, same data.

    python scripts/bench.py [--epochs 20] [--train-file data/mnist.pkl]

Runs each trainer as its own process on the same machine, one after the other,
and prints each one's median steady-state epoch time (epochs 2..N; epoch 1
includes compilation), their ratio, and each one's final test accuracy; then
the cost of checkpointing every epoch, against a run that saves only at the end. Needs
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
from pathlib import Path

# The seed's mnist_mlp.py (Keras example), reading the same pickle, with a
# callback that records each epoch's wall time including validation.
KERAS_SCRIPT = textwrap.dedent("""
    import json, pickle, sys, time
    import keras
    from keras.layers import Dense, Dropout
    from keras.models import Sequential
    from keras.optimizers import RMSprop

    train_file, epochs, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
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
    json.dump({"epoch_times": Timer.times, "test_accuracy": score[1]}, open(out, "w"))
""")


def run_keras(train_file: str, epochs: int, workdir: Path) -> dict:
    script, out = workdir / "mnist_mlp_keras.py", workdir / "keras.json"
    script.write_text(KERAS_SCRIPT)
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    subprocess.run([sys.executable, str(script), train_file, str(epochs), str(out)], check=True, env=env)
    return json.loads(out.read_text())


def run_ours(train_file: str, epochs: int, workdir: Path, *extra: str) -> dict:
    job_dir = workdir / f"job{len(list(workdir.glob('job*')))}"
    subprocess.run([sys.executable, "-m", "mnist_jax.train", "--train-file", train_file, "--epochs", str(epochs),
                    "--job-dir", str(job_dir), *extra], check=True, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (job_dir / "metrics.jsonl").read_text().splitlines()]
    return {"epoch_times": [r["epoch_time_s"] for r in records], "test_accuracy": records[-1]["val_accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--train-file", default="data/mnist.pkl")
    args = parser.parse_args()
    if not os.path.exists(args.train_file):
        subprocess.run([sys.executable, "-m", "mnist_jax.data", "download", "--out", args.train_file], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        results = {"keras 3 (jax backend)": run_keras(args.train_file, args.epochs, Path(tmp)),
                   "mnist-jax": run_ours(args.train_file, args.epochs, Path(tmp)),
                   # Checkpointing's cost: the same job saving only after its last epoch.
                   "mnist-jax, no ckpt": run_ours(args.train_file, args.epochs, Path(tmp),
                                                  "--checkpoint-every", str(args.epochs))}
    print(f"\n{args.epochs} epochs, {os.cpu_count()} CPU cores")
    print(f"{'trainer':<24}{'median epoch (s)':>18}{'first epoch (s)':>17}{'test accuracy':>15}")
    medians = {}
    for name, result in results.items():
        times = result["epoch_times"]
        medians[name] = statistics.median(times[1:] or times)
        print(f"{name:<24}{medians[name]:>18.3f}{times[0]:>17.3f}{result['test_accuracy']:>15.4f}")
    keras_median, ours_median, unsaved_median = medians.values()
    print(f"ratio mnist-jax / keras: {ours_median / keras_median:.3f}")
    print(f"checkpoint every epoch costs {100 * (ours_median / unsaved_median - 1):+.1f}% of epoch time")


if __name__ == "__main__":
    main()
