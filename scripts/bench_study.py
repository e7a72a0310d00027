"""Host cost of a wide study: 64 trials x 20 epochs in 64 lanes of a tiny model, where the device part is small.

    python scripts/bench_study.py [--trials 64] [--epochs 20] [--lanes 64] [--hidden-units 16] [--examples 384]
                                  [--pbt] [--perturb-every 2] [--keep DIR]

It writes a pickle of `--examples` random training examples, fills the
compile cache with a one-epoch run of the same study, then runs the study
(random search over both dropout rates and the learning rate, `--vectorize
LANES`; with `--pbt`, the trials as one population perturbed every
`--perturb-every` epochs) and prints

    host ms per trial-epoch = (wall - start-up - group epochs) / trial-epochs

where wall is the command's time to `study.json`, start-up the time to the
first trial's first epoch line less that epoch's time, and group epochs the
epoch programs' times (each epoch once, as its lanes train together). What
is left is every trial's start and finish (checkpoints, exports, curves,
TensorBoard, the study's storage) and every epoch's reports.
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


def epoch_times(root: Path, summary: dict) -> dict[int, float]:
    """Each group epoch's program time (the lanes of an epoch train together: the longest record of it)."""
    per_epoch: dict[int, float] = {}
    for t in summary["trials"]:
        for line in (root / Path(t["job_dir"]).name / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            per_epoch[record["epoch"]] = max(per_epoch.get(record["epoch"], 0.0), record["epoch_time_s"])
    return per_epoch


def main() -> None:
    parser = study_parser(__doc__.splitlines()[0], trials=64, epochs=20, lanes=64)
    parser.add_argument("--hidden-units", type=int, default=16)
    parser.add_argument("--examples", type=int, default=384)
    parser.add_argument("--pbt", action="store_true", help="run the trials as one population (tune run --pbt)")
    parser.add_argument("--perturb-every", type=int, default=2)
    parser.add_argument("--keep", default=None, help="keep the studies in this directory")
    args = parser.parse_args()
    flags = ["--vectorize", str(args.lanes)]
    if args.pbt:
        flags += ["--pbt", "--perturb-every", str(args.perturb_every)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        root.mkdir(parents=True, exist_ok=True)
        (root / "data.pkl").write_bytes(pickle.dumps(random_mnist(args.examples, args.examples // 3)))
        trainer = ["--train-file", str(root / "data.pkl"), "--hidden-units", str(args.hidden_units)]
        env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(root / "xla-cache")}
        config = study_config(args.trials)
        # Fills the compile cache with every program of the study (perturbations included), so the run below
        # compiles nothing.
        warm = ["--epochs", str(min(args.epochs, 2 * args.perturb_every + 1))]
        timed_study(root, "warm-up", config, flags, [*trainer, *warm], env)
        wall, wide, first_epoch = timed_study(
            root, "wide", config, flags, [*trainer, "--epochs", str(args.epochs)], env
        )
        epochs = epoch_times(root / "wide", wide)
        trial_epochs = sum(len(t["measurements"]) for t in wide["trials"])
    if first_epoch is None:
        raise SystemExit("the study printed no line for its first trial's first epoch: no start-up to subtract")
    start_up = first_epoch - epochs[1]
    host_ms = 1000 * (wall - start_up - sum(epochs.values())) / trial_epochs
    kind = f"a population perturbed every {args.perturb_every} epochs" if args.pbt else "random search"
    print(f"{args.trials} trials x {args.epochs} epochs in {args.lanes} lanes, {kind}, hidden units "
          f"{args.hidden_units}, {args.examples} examples, {os.cpu_count()} CPU cores")  # fmt: skip
    succeeded = sum(t["status"] == "SUCCEEDED" for t in wide["trials"])
    print(f"wall {wall:.1f} s: start-up {start_up:.1f} s, group epochs {sum(epochs.values()):.1f} s, "
          f"{trial_epochs} trial-epochs, {succeeded} succeeded")  # fmt: skip
    print(f"host time per trial-epoch: {host_ms:.1f} ms")


if __name__ == "__main__":
    main()
