"""Is population-based training worth it? A population against random search with the same budget, on real MNIST.

    python scripts/bench_pbt.py [--members 16] [--epochs 20] [--seeds 0 1 2] [--perturb-every 2]
                                [--lr-min 1e-4] [--lr-max 1e-2] [--train-file data/mnist.pkl] [--keep DIR]

For each seed it runs the same study twice, in `--members` lanes of one
program: random search over the seed's space (`dropout-one` and
`dropout-two`, 0.1 to 0.5, reverse log) plus the learning rate (log, from
`--lr-min` to `--lr-max`), `--members` trials of `--epochs` epochs; and the
same trials as one population (`tune run --pbt`, first settings drawn by
random search, perturbed every `--perturb-every` epochs). Both hold out the
last tenth of the training set (`--validation-split 0.1`): the study's metric
is the validation accuracy, and the model the study picks is then measured on
the test set, which no choice saw. It prints, per seed and mode, the best
validation accuracy, the chosen model's test accuracy and the wall time, then
the means.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import tempfile
from pathlib import Path

from bench_tune import timed_study

TEST_ACCURACY = re.compile(r"^Test accuracy: ([0-9.]+)$", re.MULTILINE)


def study_config(members: int, lr_min: float, lr_max: float) -> dict:
    dropout = {"doubleValueSpec": {"minValue": 0.1, "maxValue": 0.5}, "scaleType": "UNIT_REVERSE_LOG_SCALE"}
    spec = {
        "metrics": [{"metricId": "accuracy", "goal": "MAXIMIZE"}],
        "parameters": [
            {"parameterId": "dropout-one", **dropout},
            {"parameterId": "dropout-two", **dropout},
            {
                "parameterId": "learning-rate",
                "doubleValueSpec": {"minValue": lr_min, "maxValue": lr_max},
                "scaleType": "UNIT_LOG_SCALE",
            },
        ],
        "algorithm": "RANDOM_SEARCH",
    }
    return {"studySpec": spec, "maxTrialCount": members, "parallelTrialCount": 1}


def measure(root: Path, name: str, args: argparse.Namespace, seed: int, *extra: str) -> dict:
    config = study_config(args.members, args.lr_min, args.lr_max)
    flags = ["--vectorize", str(args.members), *extra]
    trainer = ["--train-file", args.train_file, "--epochs", str(args.epochs), "--validation-split", "0.1"]
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(root / "xla-cache")}
    wall, summary, _ = timed_study(root, name, config, flags, trainer, env, seed)
    best = summary["best"]
    log = (root / name / Path(best["job_dir"]).name / "train.log").read_text()
    return {"best": best["metric"], "test": float(TEST_ACCURACY.findall(log)[-1]), "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--perturb-every", type=int, default=2)
    parser.add_argument("--lr-min", type=float, default=1e-4)
    parser.add_argument("--lr-max", type=float, default=1e-2)
    parser.add_argument("--train-file", default="data/mnist.pkl")
    parser.add_argument("--keep", default=None, help="keep the studies in this directory")
    args = parser.parse_args()
    args.train_file = os.path.abspath(args.train_file)
    modes = {"random search": (), "PBT": ("--pbt", "--perturb-every", str(args.perturb_every))}
    results: dict[str, list[dict]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        root.mkdir(parents=True, exist_ok=True)
        for seed in args.seeds:
            for mode, extra in modes.items():
                name = f"{'pbt' if extra else 'random'}-{seed}"
                results[mode].append(measure(root, name, args, seed, *extra))
                row = results[mode][-1]
                print(f"seed {seed} {mode:<14} best validation {row['best']:.4f}  test {row['test']:.4f}  "
                      f"wall {row['wall']:.0f} s", flush=True)  # fmt: skip
    print(f"\n{args.members} members x {args.epochs} epochs, learning rate {args.lr_min:g}..{args.lr_max:g}, "
          f"seeds {args.seeds}, {os.cpu_count()} CPU cores")  # fmt: skip
    print(f"{'mode':<16}{'best validation':>16}{'chosen test':>13}{'wall s':>9}")
    for mode, rows in results.items():
        mean = {key: statistics.mean(row[key] for row in rows) for key in ("best", "test", "wall")}
        print(f"{mode:<16}{mean['best']:>16.4f}{mean['test']:>13.4f}{mean['wall']:>9.0f}")


if __name__ == "__main__":
    main()
