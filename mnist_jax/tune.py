"""Hyperparameter tuning: study configs (legacy ML Engine <-> Vertex AI) and local studies.

    python -m mnist_jax.tune convert configs/hptuning_config.yaml
    python -m mnist_jax.tune run --config configs/hptuning_config.yaml --job-dir DIR \\
        [--max-trials N] [--parallel-trials P] [--seed S] [-- extra trainer flags]

`convert` prints the Vertex AI `gcloud ai hp-tuning-jobs create --config` form
of a legacy `trainingInput.hyperparameters` study. `run` runs a study on this
machine as the tuning service would: each trial is a real
`python -m mnist_jax.train` process given its parameters as `--name=value`
flags, with its own job dir `DIR/trial-<id>` and its own hypertune metric file,
at most P at once. With `--vectorize K`, K trials at a time train together in
one `python -m mnist_jax.multitrial` program (one vmapped, jitted epoch), each
writing its outputs as if it had run alone. Trials are drawn by random search with each parameter's
scale type (the same `--seed` draws the same trials). A failed trial is
recorded with its error; the study stops once `maxFailedTrials` have failed.
The leaderboard is printed and written to `DIR/study.json`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mnist_jax import storage
from mnist_jax.errors import ConfigError, MnistJaxError, report

SCALE_TYPES = ("NONE", "UNIT_LINEAR_SCALE", "UNIT_LOG_SCALE", "UNIT_REVERSE_LOG_SCALE")
PARAMETER_TYPES = ("DOUBLE", "INTEGER", "CATEGORICAL", "DISCRETE")
_VALUE_SPECS = {
    "DOUBLE": "doubleValueSpec",
    "INTEGER": "integerValueSpec",
    "CATEGORICAL": "categoricalValueSpec",
    "DISCRETE": "discreteValueSpec",
}
# The trial job of the Vertex form: the trainer's container; scripts/submit_vertex_hpt.sh fills
# in IMAGE_URI and BUCKET. Vertex gives each trial AIP_MODEL_DIR under baseOutputDirectory/<trial>.
TRIAL_JOB_SPEC = {
    "workerPoolSpecs": [
        {
            "machineSpec": {"machineType": "n1-standard-4"},
            "replicaCount": 1,
            "containerSpec": {"imageUri": "IMAGE_URI", "args": ["--train-file=gs://BUCKET/data/mnist.pkl"]},
        }
    ],
    "baseOutputDirectory": {"outputUriPrefix": "gs://BUCKET/hptuning"},
}


@dataclasses.dataclass(frozen=True)
class Parameter:
    name: str
    type: str
    min_value: float | None = None
    max_value: float | None = None
    values: tuple[Any, ...] = ()
    scale: str = "NONE"

    def sample(self, rng: np.random.Generator) -> Any:
        """One draw: uniform u mapped through the scale type (facts: same formulas as Vizier)."""
        if self.type in ("CATEGORICAL", "DISCRETE"):
            return self.values[int(rng.integers(len(self.values)))]
        low, high = float(self.min_value), float(self.max_value)  # type: ignore[arg-type]
        if self.type == "INTEGER" and self.scale in ("NONE", "UNIT_LINEAR_SCALE"):
            return int(rng.integers(int(low), int(high) + 1))
        value = scale_value(float(rng.random()), low, high, self.scale)
        return int(round(value)) if self.type == "INTEGER" else value


def scale_value(u: float, low: float, high: float, scale: str) -> float:
    """Maps u in [0, 1] onto [low, high]: linear, log (dense near low) or reverse log (dense near high)."""
    if scale == "UNIT_LOG_SCALE":
        return low * (high / low) ** u
    if scale == "UNIT_REVERSE_LOG_SCALE":
        return low + high - low * (high / low) ** (1 - u)
    return low + u * (high - low)


@dataclasses.dataclass(frozen=True)
class Study:
    goal: str  # MAXIMIZE or MINIMIZE
    metric: str
    parameters: tuple[Parameter, ...]
    max_trials: int
    parallel_trials: int
    max_failed_trials: int
    algorithm: str = "ALGORITHM_UNSPECIFIED"
    early_stopping: bool = False


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_parameter(p: Parameter) -> Parameter:
    _require(p.type in PARAMETER_TYPES, f"parameter {p.name}: type must be one of {PARAMETER_TYPES}, got {p.type}")
    _require(p.scale in SCALE_TYPES, f"parameter {p.name}: scaleType must be one of {SCALE_TYPES}, got {p.scale}")
    if p.type in ("CATEGORICAL", "DISCRETE"):
        _require(bool(p.values), f"parameter {p.name}: {p.type} needs values")
    else:
        _require(
            p.min_value is not None and p.max_value is not None and p.min_value <= p.max_value,
            f"parameter {p.name}: needs minValue <= maxValue",
        )
        if p.scale in ("UNIT_LOG_SCALE", "UNIT_REVERSE_LOG_SCALE"):
            _require(p.min_value > 0, f"parameter {p.name}: a log scale needs minValue > 0")  # type: ignore[operator]
    return p


def study_from_legacy(document: dict[str, Any]) -> Study:
    """Reads `trainingInput.hyperparameters` (ML Engine / AI Platform Training)."""
    spec = document.get("trainingInput", document).get("hyperparameters")
    _require(isinstance(spec, dict), "legacy study: no trainingInput.hyperparameters")
    parameters = tuple(
        _check_parameter(
            Parameter(
                name=p["parameterName"],
                type=p["type"],
                min_value=p.get("minValue"),
                max_value=p.get("maxValue"),
                values=tuple(p.get("categoricalValues") or p.get("discreteValues") or ()),
                scale=p.get("scaleType", "NONE"),
            )
        )
        for p in spec.get("params", [])
    )
    max_trials = int(spec.get("maxTrials", 1))
    return Study(
        goal=spec.get("goal", "MAXIMIZE"),
        metric=spec.get("hyperparameterMetricTag", "accuracy"),
        parameters=parameters,
        max_trials=max_trials,
        parallel_trials=int(spec.get("maxParallelTrials", 1)),
        max_failed_trials=int(spec.get("maxFailedTrials") or max_trials),
        algorithm=spec.get("algorithm", "ALGORITHM_UNSPECIFIED"),
        early_stopping=bool(spec.get("enableTrialEarlyStopping", False)),
    )


def study_from_vertex(document: dict[str, Any]) -> Study:
    """Reads a Vertex AI hyperparameter tuning job config (`studySpec`, counts)."""
    spec = document["studySpec"]
    (metric,) = spec["metrics"]
    parameters = []
    for p in spec["parameters"]:
        kind = next((t for t, key in _VALUE_SPECS.items() if key in p), None)
        _require(kind is not None, f"parameter {p.get('parameterId')}: no value spec")
        values = p[_VALUE_SPECS[kind]]  # type: ignore[index]
        parameters.append(
            _check_parameter(
                Parameter(
                    name=p["parameterId"],
                    type=kind,
                    min_value=values.get("minValue"),  # type: ignore[arg-type]
                    max_value=values.get("maxValue"),
                    values=tuple(values.get("values", ())),
                    scale=p.get("scaleType", "NONE"),
                )
            )
        )
    max_trials = int(document.get("maxTrialCount", 1))
    return Study(
        goal=metric["goal"],
        metric=metric["metricId"],
        parameters=tuple(parameters),
        max_trials=max_trials,
        parallel_trials=int(document.get("parallelTrialCount", 1)),
        max_failed_trials=int(document.get("maxFailedTrialCount") or max_trials),
        algorithm=spec.get("algorithm", "ALGORITHM_UNSPECIFIED"),
        early_stopping="medianAutomatedStoppingSpec" in spec,
    )


def load_study(path: str) -> tuple[Study, dict[str, Any]]:
    """Reads a legacy or Vertex study config; returns it and the raw document."""
    try:
        with open(path) as f:
            document = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read study config {path}: {e}") from None
    _require(isinstance(document, dict), f"{path}: not a YAML mapping")
    try:
        study = study_from_vertex(document) if "studySpec" in document else study_from_legacy(document)
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{path}: not a legacy or Vertex study config: {e!r}") from None
    return study, document


def to_vertex(study: Study) -> dict[str, Any]:
    """The Vertex AI hp-tuning-jobs config of `study`."""
    parameters = []
    for p in study.parameters:
        if p.type in ("CATEGORICAL", "DISCRETE"):
            values: dict[str, Any] = {"values": list(p.values)}
        elif p.type == "INTEGER":
            values = {"minValue": int(p.min_value), "maxValue": int(p.max_value)}  # type: ignore[arg-type]
        else:
            values = {"minValue": p.min_value, "maxValue": p.max_value}
        entry: dict[str, Any] = {"parameterId": p.name, _VALUE_SPECS[p.type]: values}
        if p.scale != "NONE" and p.type in ("DOUBLE", "INTEGER"):
            entry["scaleType"] = p.scale
        parameters.append(entry)
    spec: dict[str, Any] = {
        "metrics": [{"metricId": study.metric, "goal": study.goal}],
        "parameters": parameters,
        "algorithm": study.algorithm,
    }
    if study.early_stopping:
        spec["medianAutomatedStoppingSpec"] = {"useElapsedDuration": False}
    return {
        "studySpec": spec,
        "maxTrialCount": study.max_trials,
        "parallelTrialCount": study.parallel_trials,
        "maxFailedTrialCount": study.max_failed_trials,
        "trialJobSpec": TRIAL_JOB_SPEC,
    }


def draw_trials(study: Study, count: int, seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    return [{p.name: p.sample(rng) for p in study.parameters} for _ in range(count)]


def _flag_value(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def read_metric(path: Path, tag: str) -> list[tuple[int, float]]:
    """(global_step, value) pairs a trial reported for `tag` in its hypertune metric file."""
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(int(line["global_step"]), float(line[tag])) for line in lines if tag in line]


def _trial_setup(trial_id: int, params: dict[str, Any], root: Path, extra: Sequence[str]) -> tuple[list[str], dict]:
    """A trial's trainer flags and variables: its parameters as --name=value, its own job dir and metric file."""
    job_dir = root / f"trial-{trial_id}"
    job_dir.mkdir(parents=True, exist_ok=True)
    argv = [*extra, "--job-dir", str(job_dir), *(f"--{name}={_flag_value(value)}" for name, value in params.items())]
    return argv, {"CLOUD_ML_TRIAL_ID": str(trial_id), "CLOUD_ML_HP_METRIC_FILE": str(job_dir / "hypertune.metrics")}


def run_unit(
    trials: list[tuple[int, dict[str, Any]]], root: Path, extra: Sequence[str], metric: str
) -> list[dict[str, Any]]:
    """Runs one trial as `python -m mnist_jax.train`, or several in one `python -m mnist_jax.multitrial`
    program; returns each trial's record for study.json."""
    setups = [_trial_setup(trial_id, params, root, extra) for trial_id, params in trials]
    if len(trials) == 1:
        ((argv, env),) = setups
        command, log_path = (
            [sys.executable, "-m", "mnist_jax.train", *argv],
            root / f"trial-{trials[0][0]}" / "train.log",
        )
    else:
        group = root / f"group-{trials[0][0]}-{trials[-1][0]}.json"
        group.write_text(json.dumps([{"argv": argv, "env": env} for argv, env in setups], indent=2))
        command, log_path = [sys.executable, "-m", "mnist_jax.multitrial", str(group)], group.with_suffix(".log")
        env = {}
    with open(log_path, "w") as log:
        result = subprocess.run(command, env={**os.environ, **env}, stdout=log, stderr=subprocess.PIPE, text=True)
    lines = result.stderr.strip().splitlines()
    error = (lines[-1] if lines else f"exit {result.returncode}") if result.returncode else None
    records = []
    for (trial_id, params), (_, trial_env) in zip(trials, setups):
        record: dict[str, Any] = {"id": trial_id, "params": params, "job_dir": str(root / f"trial-{trial_id}")}
        measurements = [] if error else read_metric(Path(trial_env["CLOUD_ML_HP_METRIC_FILE"]), metric)
        if error or not measurements:
            record.update(status="FAILED", metric=None, error=error or f"trial reported no '{metric}' metric")
        else:  # the final measurement is the trial's metric
            record.update(status="SUCCEEDED", metric=measurements[-1][1], measurements=measurements)
        records.append(record)
    return records


def run_study(study: Study, job_dir: Path, seed: int, extra: Sequence[str], vectorize: int = 1) -> dict[str, Any]:
    """Runs the study's trials, at most `parallel_trials` programs at once, each training `vectorize`
    trials together; returns study.json's content."""
    trials: list[dict[str, Any]] = []
    failed = 0
    draws = list(enumerate(draw_trials(study, study.max_trials, seed), start=1))
    units = [draws[i : i + vectorize] for i in range(0, len(draws), vectorize)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=study.parallel_trials) as pool:
        pending: set[concurrent.futures.Future] = set()
        while units or pending:
            while units and len(pending) < study.parallel_trials and failed < study.max_failed_trials:
                pending.add(pool.submit(run_unit, units.pop(0), job_dir, extra, study.metric))
            if not pending:
                break
            done, pending = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
            for record in (record for future in done for record in future.result()):
                failed += record["status"] == "FAILED"
                trials.append(record)
                print(f"trial {record['id']}: {record['status']} {record.get('metric')} {record['params']}", flush=True)
    trials.sort(key=lambda t: t["id"])
    succeeded = [t for t in trials if t["status"] == "SUCCEEDED"]
    pick = max if study.goal == "MAXIMIZE" else min
    best = pick(succeeded, key=lambda t: t["metric"]) if succeeded else None
    # As on Vertex: the study fails once maxFailedTrials trials have failed (or none succeeded).
    status = "SUCCEEDED" if succeeded and failed < study.max_failed_trials else "FAILED"
    return {"goal": study.goal, "metric": study.metric, "status": status, "seed": seed, "trials": trials, "best": best}


def leaderboard(result: dict[str, Any]) -> str:
    """The trials as a table, best first."""
    names = sorted({name for t in result["trials"] for name in t["params"]})
    reverse = result["goal"] == "MAXIMIZE"
    ranked = sorted(
        result["trials"], key=lambda t: (t["metric"] is None, -(t["metric"] or 0) if reverse else (t["metric"] or 0))
    )
    header = f"{'rank':>4}  {'trial':>5}  {'status':<9}  {result['metric']:>12}  " + "  ".join(
        f"{n:>14}" for n in names
    )
    rows = [header, "-" * len(header)]
    for rank, t in enumerate(ranked, 1):
        metric = f"{t['metric']:.4f}" if t["metric"] is not None else "-"
        values = "  ".join(f"{_short(t['params'].get(n)):>14}" for n in names)
        rows.append(f"{rank:>4}  {t['id']:>5}  {t['status']:<9}  {metric:>12}  {values}")
    return "\n".join(rows)


def _short(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) and math.isfinite(value) else str(value)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python -m mnist_jax.tune", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="print the Vertex AI form of a legacy study config")
    convert.add_argument("config")
    run = commands.add_parser("run", help="run a study locally")
    run.add_argument("--config", required=True, help="legacy or Vertex study config (YAML)")
    run.add_argument("--job-dir", required=True, help="local directory for the trials and study.json")
    run.add_argument("--max-trials", type=int, default=None, help="override the study's trial count")
    run.add_argument("--parallel-trials", type=int, default=None, help="override the study's parallel trials")
    run.add_argument("--seed", type=int, default=0, help="random-search seed: the same seed draws the same trials")
    run.add_argument(
        "--vectorize",
        type=int,
        default=1,
        metavar="K",
        help="train K trials at once in one program (they may differ only in dropout rates, learning rate and seed)",
    )
    args = parser.parse_args(own)
    try:
        study, _ = load_study(args.config)
        if args.command == "convert":
            print(yaml.safe_dump(to_vertex(study), sort_keys=False), end="")
            return 0
        overrides = {
            k: v
            for k, v in (("max_trials", args.max_trials), ("parallel_trials", args.parallel_trials))
            if v is not None
        }
        _require(
            all(v >= 1 for v in (*overrides.values(), args.vectorize)),
            "--max-trials, --parallel-trials and --vectorize must be >= 1",
        )
        study = dataclasses.replace(study, **overrides)
        job_dir = Path(args.job_dir)
        job_dir.mkdir(parents=True, exist_ok=True)
        result = run_study(study, job_dir, args.seed, extra, args.vectorize)
    except MnistJaxError as e:
        return report(e)
    storage.write_bytes_atomic(str(job_dir / "study.json"), (json.dumps(result, indent=2) + "\n").encode())
    print(leaderboard(result))
    best = result["best"]
    print(f"best: trial {best['id']} {study.metric}={best['metric']:.4f} {best['params']}" if best else "best: none")
    return 0 if result["status"] == "SUCCEEDED" else 1


if __name__ == "__main__":
    sys.exit(main())
