"""Host cost of a wide study: 64 trials x 20 epochs in 64 lanes of a tiny model, where the device part is small.

    python scripts/bench_study.py [--trials 64] [--epochs 20] [--lanes 64] [--hidden-units 16] [--examples 384]

It writes a pickle of `--examples` random training examples, then runs the
same `python -m mnist_jax.tune run` command twice, after warming the compile
cache: once with one trial (start-up, compile, one trial's epochs and
outputs), and once with every trial (random search over both dropout rates
and the learning rate, `--vectorize LANES`). It prints both wall times (command
to `study.json`), the sum of the wide study's group epochs (the programs), and

    host ms per trial-epoch = (wide wall - one-trial wall - group epochs) / trial-epochs

which counts every trial's start and finish (checkpoints, exports, curves,
TensorBoard, the study's storage) beyond what one trial costs.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path

import numpy as np
from bench_tune import study_parser, timed_study


def random_mnist(n_train: int, n_test: int) -> tuple:
    """Random images and labels in the seed's layout: the device part is tiny, and host costs do not depend
    on what the trials learn."""
    rng = np.random.default_rng(0)
    return tuple(
        (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8))
        for n in (n_train, n_test)
    )


def study_config(trials: int) -> dict:
    spec = {
        "metrics": [{"metricId": "accuracy", "goal": "MAXIMIZE"}],
        "parameters": [
            {"parameterId": name, "doubleValueSpec": {"minValue": 0.1, "maxValue": 0.5}}
            for name in ("dropout-one", "dropout-two")
        ]
        + [
            {
                "parameterId": "learning-rate",
                "doubleValueSpec": {"minValue": 1e-4, "maxValue": 1e-2},
                "scaleType": "UNIT_LOG_SCALE",
            }
        ],
        "algorithm": "RANDOM_SEARCH",
    }
    return {"studySpec": spec, "maxTrialCount": trials, "parallelTrialCount": 1}


def run(root: Path, name: str, trials: int, lanes: int, trainer: list[str], env: dict) -> tuple[float, dict]:
    return timed_study(root, name, study_config(trials), ["--vectorize", str(lanes)], trainer, env)


def group_epochs_s(root: Path, summary: dict) -> float:
    """The group epochs' program time: each epoch's time, once per epoch of the lanes that trained together."""
    per_epoch: dict[int, float] = {}
    for t in summary["trials"]:
        for line in (root / Path(t["job_dir"]).name / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            per_epoch[record["epoch"]] = max(per_epoch.get(record["epoch"], 0.0), record["epoch_time_s"])
    return sum(per_epoch.values())


def main() -> None:
    parser = study_parser(__doc__.splitlines()[0], trials=64, epochs=20, lanes=64)
    parser.add_argument("--hidden-units", type=int, default=16)
    parser.add_argument("--examples", type=int, default=384)
    parser.add_argument("--keep", default=None, help="keep the studies in this directory")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        root.mkdir(parents=True, exist_ok=True)
        (root / "data.pkl").write_bytes(pickle.dumps(random_mnist(args.examples, args.examples // 3)))
        trainer = ["--train-file", str(root / "data.pkl"), "--epochs", str(args.epochs)]
        trainer += ["--hidden-units", str(args.hidden_units)]
        env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(root / "xla-cache")}
        # Fills the compile cache with both programs (one lane, all lanes), so neither run below compiles.
        run(root, "warm-up-one", 1, args.lanes, trainer[:3] + ["1", *trainer[4:]], env)
        run(root, "warm-up-all", args.lanes, args.lanes, trainer[:3] + ["1", *trainer[4:]], env)
        one_wall, _ = run(root, "one-trial", 1, args.lanes, trainer, env)
        wide_wall, wide = run(root, "wide", args.trials, args.lanes, trainer, env)
        epochs_s = group_epochs_s(root / "wide", wide)
        trial_epochs = sum(len(t["measurements"]) for t in wide["trials"])
    host_ms = 1000 * (wide_wall - one_wall - epochs_s) / trial_epochs
    print(f"{args.trials} trials x {args.epochs} epochs in {args.lanes} lanes, hidden units {args.hidden_units}, "
          f"{args.examples} examples, {os.cpu_count()} CPU cores")  # fmt: skip
    print(f"one trial:  {one_wall:.1f} s wall")
    print(f"the study:  {wide_wall:.1f} s wall, {epochs_s:.1f} s of group epochs, {trial_epochs} trial-epochs, "
          f"{sum(t['status'] == 'SUCCEEDED' for t in wide['trials'])} succeeded")  # fmt: skip
    print(f"host time per trial-epoch: {host_ms:.1f} ms")


if __name__ == "__main__":
    main()
