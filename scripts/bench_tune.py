"""Tuning throughput: a 12-trial study one trial at a time, against median stopping in 4 refilling lanes.

    python scripts/bench_tune.py [--trials 12] [--epochs 3] [--lanes 4] [--train-file data/mnist.pkl]

The study searches the learning rate (1e-5 to 3e-3, log scale) and
`dropout-one` (0.1 to 0.5, reverse log) with Bayesian search and the same
seed, on real MNIST. It runs twice, in this order, each with an empty compile
cache and its own job dir:
- one trial at a time without stopping: each trial a `python -m mnist_jax.train`
  process, as a Vertex study with one parallel trial runs them;
- median stopping in `--lanes` lanes of one program (`--vectorize`), refilled
  as trials end or are stopped.
It prints, for each: wall time (command start to `study.json`), trial-epochs
trained, trials stopped, and the best trial's metric; then the wall-time
ratio and the difference between the two best metrics, in points.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import yaml


def study_config(trials: int, lanes: int, stopping: bool) -> dict:
    spec = {
        "metrics": [{"metricId": "accuracy", "goal": "MAXIMIZE"}],
        "parameters": [
            {
                "parameterId": "learning-rate",
                "doubleValueSpec": {"minValue": 1e-5, "maxValue": 3e-3},
                "scaleType": "UNIT_LOG_SCALE",
            },
            {
                "parameterId": "dropout-one",
                "doubleValueSpec": {"minValue": 0.1, "maxValue": 0.5},
                "scaleType": "UNIT_REVERSE_LOG_SCALE",
            },
        ],
        "algorithm": "ALGORITHM_UNSPECIFIED",
    }
    if stopping:
        spec["medianAutomatedStoppingSpec"] = {"useElapsedDuration": False}
    return {"studySpec": spec, "maxTrialCount": trials, "parallelTrialCount": 1 if not stopping else lanes}


FIRST_EPOCH = re.compile(r"^trial \d+ epoch 1: ")  # the driver's line for a trial's first epoch


def timed_study(
    root: Path, name: str, config: dict, tune_flags: Sequence[str], trainer: Sequence[str], env: dict, seed: int = 0
) -> tuple[float, dict, float | None]:
    """`python -m mnist_jax.tune run` of `config` (search seed `seed`) in job dir `root/name`: its wall time, command to
    `study.json`, that `study.json`, and when the first trial's first epoch line came, from the command's start
    (bench_study.py times its studies with it too)."""
    (root / f"{name}.yaml").write_text(yaml.safe_dump(config))
    command = [
        sys.executable, "-m", "mnist_jax.tune", "run", "--config", str(root / f"{name}.yaml"),
        "--job-dir", str(root / name), "--seed", str(seed), *tune_flags, "--", *trainer,
    ]  # fmt: skip
    started, first_epoch = time.perf_counter(), None
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) as process:
        for line in process.stdout:  # type: ignore[union-attr]
            if first_epoch is None and FIRST_EPOCH.match(line):
                first_epoch = time.perf_counter() - started
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, command)
    wall = time.perf_counter() - started
    return wall, json.loads((root / name / "study.json").read_text()), first_epoch


def run(
    root: Path, name: str, config: dict, epochs: int, train_file: str, *extra: str
) -> tuple[float, dict, float | None]:
    """A study with an empty compile cache of its own."""
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(root / f"{name}-xla-cache")}
    return timed_study(root, name, config, extra, ["--train-file", train_file, "--epochs", str(epochs)], env)


def study_parser(description: str, trials: int, epochs: int, lanes: int) -> argparse.ArgumentParser:
    """A study bench's size flags with their defaults (bench_study.py's too)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--trials", type=int, default=trials)
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--lanes", type=int, default=lanes)
    return parser


def main() -> None:
    parser = study_parser(__doc__.splitlines()[0], trials=12, epochs=3, lanes=4)
    parser.add_argument("--train-file", default="data/mnist.pkl")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        one = run(root, "one-at-a-time", study_config(args.trials, args.lanes, False), args.epochs, args.train_file)
        lanes = run(
            root,
            "median-lanes",
            study_config(args.trials, args.lanes, True),
            args.epochs,
            args.train_file,
            "--vectorize",
            str(args.lanes),
        )
    print(f"\n{args.trials} trials of up to {args.epochs} epochs, real MNIST, {os.cpu_count()} CPU cores")
    print(f"{'mode':<34}{'wall s':>8}{'trial-epochs':>14}{'stopped':>9}{'best':>9}")
    rows = (("one at a time, no stopping", one), (f"median stopping, {args.lanes} lanes", lanes))
    for label, (wall, study, _) in rows:
        trial_epochs = sum(len(t["measurements"]) for t in study["trials"])
        stopped = sum(t["status"] == "STOPPED" for t in study["trials"])
        print(f"{label:<34}{wall:>8.1f}{trial_epochs:>14}{stopped:>9}{study['best']['metric']:>9.4f}")
    print(f"wall time, lanes / one at a time: {lanes[0] / one[0]:.3f}")
    print(f"best metric difference: {100 * (lanes[1]['best']['metric'] - one[1]['best']['metric']):+.2f} points")


if __name__ == "__main__":
    main()
