"""Tuning throughput: 4 trials one after another against 4 trials in one vectorized program.

    python scripts/bench_tune.py [--trials 4] [--epochs 20] [--train-file data/mnist.pkl]

Runs the shipped study (configs/hptuning_config.yaml) twice on real data with
the same seed, so both runs draw the same trials: once as separate
`python -m mnist_jax.train` processes, one at a time, and once with
`--vectorize` equal to the trial count. Each starts with an empty compile
cache. Prints wall times, trials per hour, their ratio, and each trial's final
accuracy both ways.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_study(root: Path, name: str, trials: int, epochs: int, train_file: str, *extra: str) -> tuple[float, dict]:
    command = [
        sys.executable,
        "-m",
        "mnist_jax.tune",
        "run",
        "--config",
        "configs/hptuning_config.yaml",
        "--job-dir",
        str(root / name),
        "--max-trials",
        str(trials),
        "--parallel-trials",
        "1",
        *extra,
        "--",
        "--train-file",
        train_file,
        "--epochs",
        str(epochs),
    ]
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(root / f"{name}-xla-cache")}
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started, json.loads((root / name / "study.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--train-file", default="data/mnist.pkl")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        one_wall, one = run_study(root, "one-at-a-time", args.trials, args.epochs, args.train_file)
        vec_wall, vec = run_study(
            root, "vectorized", args.trials, args.epochs, args.train_file, "--vectorize", str(args.trials)
        )
    print(f"\n{args.trials} trials of {args.epochs} epochs, {os.cpu_count()} CPU cores")
    print(f"{'mode':<16}{'wall s':>9}{'trials/hour':>13}")
    for name, wall in (("one at a time", one_wall), ("vectorized", vec_wall)):
        print(f"{name:<16}{wall:>9.1f}{3600 * args.trials / wall:>13.1f}")
    print(f"vectorized / one at a time wall time: {vec_wall / one_wall:.3f}")
    print(f"{'trial':>5}  {'accuracy alone':>15}  {'vectorized':>11}  {'difference (points)':>20}")
    for a, b in zip(one["trials"], vec["trials"]):
        print(f"{a['id']:>5}  {a['metric']:>15.4f}  {b['metric']:>11.4f}  {100 * (b['metric'] - a['metric']):>20.2f}")


if __name__ == "__main__":
    main()
