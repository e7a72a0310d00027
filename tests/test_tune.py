"""Study configs (legacy <-> Vertex), scale-type sampling, and local studies of real trainer runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from mnist_jax import tune

from conftest import REPO, run_module, tiny_args

CONFIGS = REPO / "configs"


def test_shipped_legacy_and_vertex_configs_agree():
    legacy, _ = tune.load_study(str(CONFIGS / "hptuning_config.yaml"))
    vertex, document = tune.load_study(str(CONFIGS / "vertex_hpt.yaml"))
    assert legacy == vertex
    assert tune.to_vertex(legacy) == document
    assert (legacy.goal, legacy.metric, legacy.max_trials, legacy.parallel_trials) == ("MAXIMIZE", "accuracy", 4, 2)
    assert [(p.name, p.type, p.min_value, p.max_value, p.scale) for p in legacy.parameters] == [
        (name, "DOUBLE", 0.1, 0.5, "UNIT_REVERSE_LOG_SCALE") for name in ("dropout-one", "dropout-two")
    ]


def test_convert_handles_every_type_and_scale(tmp_path):
    legacy = {
        "trainingInput": {
            "hyperparameters": {
                "goal": "MINIMIZE",
                "hyperparameterMetricTag": "loss",
                "maxTrials": 10,
                "maxParallelTrials": 3,
                "maxFailedTrials": 2,
                "algorithm": "RANDOM_SEARCH",
                "enableTrialEarlyStopping": True,
                "params": [
                    {
                        "parameterName": "learning-rate",
                        "type": "DOUBLE",
                        "minValue": 1e-4,
                        "maxValue": 1e-1,
                        "scaleType": "UNIT_LOG_SCALE",
                    },
                    {
                        "parameterName": "dropout-one",
                        "type": "DOUBLE",
                        "minValue": 0.1,
                        "maxValue": 0.5,
                        "scaleType": "UNIT_LINEAR_SCALE",
                    },
                    {
                        "parameterName": "hidden-units",
                        "type": "INTEGER",
                        "minValue": 64,
                        "maxValue": 1024,
                        "scaleType": "UNIT_REVERSE_LOG_SCALE",
                    },
                    {"parameterName": "epochs", "type": "INTEGER", "minValue": 1, "maxValue": 5},
                    {"parameterName": "optimizer", "type": "CATEGORICAL", "categoricalValues": ["rmsprop", "adam"]},
                    {"parameterName": "batch-size", "type": "DISCRETE", "discreteValues": [64, 128, 256]},
                ],
            }
        }
    }
    path = tmp_path / "legacy.yaml"
    path.write_text(yaml.safe_dump(legacy))
    result = run_module("tune", ["convert", str(path)], check=True)
    vertex = yaml.safe_load(result.stdout)
    spec = vertex["studySpec"]
    assert spec["metrics"] == [{"metricId": "loss", "goal": "MINIMIZE"}] and spec["algorithm"] == "RANDOM_SEARCH"
    assert "medianAutomatedStoppingSpec" in spec
    assert (vertex["maxTrialCount"], vertex["parallelTrialCount"], vertex["maxFailedTrialCount"]) == (10, 3, 2)
    by_id = {p["parameterId"]: p for p in spec["parameters"]}
    assert by_id["learning-rate"] == {
        "parameterId": "learning-rate",
        "scaleType": "UNIT_LOG_SCALE",
        "doubleValueSpec": {"minValue": 1e-4, "maxValue": 1e-1},
    }
    assert by_id["hidden-units"]["integerValueSpec"] == {"minValue": 64, "maxValue": 1024}
    assert by_id["hidden-units"]["scaleType"] == "UNIT_REVERSE_LOG_SCALE" and "scaleType" not in by_id["epochs"]
    assert by_id["optimizer"]["categoricalValueSpec"] == {"values": ["rmsprop", "adam"]}
    assert by_id["batch-size"]["discreteValueSpec"] == {"values": [64, 128, 256]}
    assert tune.study_from_vertex(vertex) == tune.study_from_legacy(legacy)  # nothing lost either way


def _uniform_ks(u: np.ndarray) -> float:
    """Kolmogorov-Smirnov distance between the sample u and U(0, 1)."""
    u = np.sort(u)
    n = len(u)
    return float(max(np.max(np.arange(1, n + 1) / n - u), np.max(u - np.arange(n) / n)))


@pytest.mark.parametrize("scale", ["UNIT_LINEAR_SCALE", "UNIT_LOG_SCALE", "UNIT_REVERSE_LOG_SCALE"])
def test_sampling_follows_the_scale_formulas(scale):
    a, b = 0.1, 0.5
    parameter = tune.Parameter("dropout-one", "DOUBLE", a, b, scale=scale)
    rng = np.random.default_rng(0)
    x = np.array([parameter.sample(rng) for _ in range(20000)])
    assert x.min() >= a and x.max() <= b
    # Invert the formula: each sample must come from a uniform u.
    u = {
        "UNIT_LINEAR_SCALE": (x - a) / (b - a),
        "UNIT_LOG_SCALE": np.log(x / a) / np.log(b / a),
        "UNIT_REVERSE_LOG_SCALE": 1 - np.log((a + b - x) / a) / np.log(b / a),
    }[scale]
    assert _uniform_ks(u) < 0.015  # the 1% critical value at n = 20000 is 0.0115; a wrong scale gives > 0.1
    median = np.median(x)
    assert {
        "UNIT_LINEAR_SCALE": abs(median - 0.3) < 0.01,
        "UNIT_LOG_SCALE": median < 0.25,
        "UNIT_REVERSE_LOG_SCALE": median > 0.35,
    }[scale]


def test_same_seed_draws_the_same_trials():
    study, _ = tune.load_study(str(CONFIGS / "hptuning_config.yaml"))
    assert tune.draw_trials(study, 4, seed=3) == tune.draw_trials(study, 4, seed=3)
    assert tune.draw_trials(study, 4, seed=3) != tune.draw_trials(study, 4, seed=4)


def _run_study(args, tmp_path, tiny_pickle):
    return run_module("tune", ["run", "--job-dir", str(tmp_path / "study"), *args, "--", *tiny_args(tiny_pickle)])


def test_local_study_runs_real_trials_and_names_the_best(tiny_pickle, tmp_path):
    result = _run_study(
        ["--config", str(CONFIGS / "hptuning_config.yaml"), "--max-trials", "3", "--seed", "1"], tmp_path, tiny_pickle
    )
    assert result.returncode == 0, result.stderr
    study = json.loads((tmp_path / "study" / "study.json").read_text())
    assert (study["goal"], study["metric"], study["status"]) == ("MAXIMIZE", "accuracy", "SUCCEEDED")
    assert len(study["trials"]) == 3
    for trial in study["trials"]:
        assert trial["status"] == "SUCCEEDED"
        assert all(0.1 <= v <= 0.5 for v in trial["params"].values())
        job_dir = tmp_path / "study" / f"trial-{trial['id']}"
        assert trial["job_dir"] == str(job_dir)
        config = json.loads((job_dir / "config.json").read_text())
        assert (config["dropout_one"], config["dropout_two"]) == (
            trial["params"]["dropout-one"],
            trial["params"]["dropout-two"],
        )
        assert config["trial_id"] == str(trial["id"])
        final = json.loads((job_dir / "metrics.jsonl").read_text().splitlines()[-1])
        assert trial["metric"] == pytest.approx(final["val_accuracy"])
        assert [step for step, _ in trial["measurements"]] == [1, 2]
    assert study["best"]["metric"] == max(t["metric"] for t in study["trials"])
    assert f"best: trial {study['best']['id']} accuracy=" in result.stdout
    assert "rank  trial  status" in result.stdout


def test_failed_trials_are_recorded_and_stop_the_study(tiny_pickle, tmp_path):
    config = {
        "studySpec": {
            "metrics": [{"metricId": "accuracy", "goal": "MAXIMIZE"}],
            "parameters": [{"parameterId": "batch-size", "categoricalValueSpec": {"values": ["thirty-two"]}}],
        },
        "maxTrialCount": 5,
        "parallelTrialCount": 1,
        "maxFailedTrialCount": 2,
    }
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    result = _run_study(["--config", str(tmp_path / "bad.yaml")], tmp_path, tiny_pickle)
    assert result.returncode == 1
    study = json.loads((tmp_path / "study" / "study.json").read_text())
    assert study["status"] == "FAILED" and study["best"] is None
    assert [t["status"] for t in study["trials"]] == ["FAILED", "FAILED"]  # stopped at maxFailedTrialCount
    assert "--batch-size/--batch_size: expected an integer, got 'thirty-two'" in study["trials"][0]["error"]
