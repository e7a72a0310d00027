"""Many trials in one program: the same math as each trial alone, outputs as if alone, resume."""

from __future__ import annotations

import json

import jax
import numpy as np

from conftest import REPO, load_final_state, run_module, run_trainer, tiny_args

TRIALS = [
    {"--dropout-one": "0.1", "--dropout-two": "0.4", "--learning-rate": "0.001", "--seed": "0"},
    {"--dropout-one": "0.35", "--dropout-two": "0.0", "--learning-rate": "0.003", "--seed": "0"},
    {"--dropout-one": "0.2", "--dropout-two": "0.2", "--learning-rate": "0.0005", "--seed": "7"},
]


def _group(tmp_path, tiny_pickle, epochs, trials=TRIALS):
    group = [
        {
            "argv": [
                *tiny_args(tiny_pickle, epochs),
                "--job-dir",
                str(tmp_path / f"vec-{i}"),
                *(f"{k}={v}" for k, v in flags.items()),
            ],
            "env": {"CLOUD_ML_TRIAL_ID": str(i), "CLOUD_ML_HP_METRIC_FILE": str(tmp_path / f"vec-{i}" / "hpt")},
        }
        for i, flags in enumerate(trials)
    ]
    path = tmp_path / "group.json"
    path.write_text(json.dumps(group))
    return run_module("multitrial", [str(path)])


def test_each_trial_matches_its_solo_run_and_writes_its_own_outputs(tiny_pickle, tmp_path):
    result = _group(tmp_path, tiny_pickle, epochs=1)
    assert result.returncode == 0, result.stderr
    assert "Training 3 trials in one program" in result.stdout
    for i, flags in enumerate(TRIALS):
        solo_dir = tmp_path / f"solo-{i}"
        run_trainer([*tiny_args(tiny_pickle, 1), "--job-dir", str(solo_dir), *(f"{k}={v}" for k, v in flags.items())])
        vec, solo = load_final_state(tmp_path / f"vec-{i}"), load_final_state(solo_dir)
        assert int(vec.step) == int(solo.step) == 4
        diff = max(
            float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(vec.params), jax.tree.leaves(solo.params))
        )
        assert diff < 1e-5, (i, diff)
        job_dir = tmp_path / f"vec-{i}"
        config = json.loads((job_dir / "config.json").read_text())
        assert config["trial_id"] == str(i) and config["dropout_one"] == float(flags["--dropout-one"])
        assert (job_dir / "model.h5").is_file() and (job_dir / "curves.png").is_file()
        vec_record = json.loads((job_dir / "metrics.jsonl").read_text())
        solo_record = json.loads((solo_dir / "metrics.jsonl").read_text())
        assert abs(vec_record["val_accuracy"] - solo_record["val_accuracy"]) < 1e-6
        (metric,) = [json.loads(line) for line in (job_dir / "hpt").read_text().splitlines()]
        assert metric["trial"] == str(i) and float(metric["accuracy"]) == vec_record["val_accuracy"]


def test_rerun_with_more_epochs_resumes_every_trial(tiny_pickle, tmp_path):
    assert _group(tmp_path, tiny_pickle, epochs=1).returncode == 0
    result = _group(tmp_path, tiny_pickle, epochs=2)
    assert result.returncode == 0, result.stderr
    assert "resuming from epoch 1" in result.stdout
    for i in range(len(TRIALS)):
        records = (tmp_path / f"vec-{i}" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(r)["epoch"] for r in records] == [1, 2]


def test_trials_must_share_shapes(tiny_pickle, tmp_path):
    trials = [{"--batch-size": "32"}, {"--batch-size": "16"}]
    result = _group(tmp_path, tiny_pickle, epochs=1, trials=trials)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: trials trained together must share batch_size")


def test_vectorized_study_equals_one_trial_at_a_time(tiny_pickle, tmp_path):
    def study(name, *args):
        config = str(REPO / "configs/hptuning_config.yaml")
        run_args = ["run", "--config", config, "--job-dir", str(tmp_path / name), "--max-trials", "3", *args]
        run_module("tune", [*run_args, "--", *tiny_args(tiny_pickle)], check=True)
        return json.loads((tmp_path / name / "study.json").read_text())

    one, vectorized = study("one"), study("vectorized", "--vectorize", "3")
    assert [t["params"] for t in one["trials"]] == [t["params"] for t in vectorized["trials"]]
    for a, b in zip(one["trials"], vectorized["trials"]):
        assert b["status"] == "SUCCEEDED" and abs(a["metric"] - b["metric"]) < 1e-6
    assert one["best"]["id"] == vectorized["best"]["id"]
