"""Studies: configs (legacy <-> Vertex), the search layer on Optuna, and local studies of real trials:
grid, median stopping, resume after SIGKILL, two workers on one storage."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml

from mnist_jax.common.status import Status
from mnist_jax.study import cli, search
from mnist_jax.study import spec as study

from helpers import REPO, read_metrics, run_here, run_process, tiny_args, wait_for, write_study

CONFIGS = REPO / "configs"
optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_shipped_legacy_and_vertex_configs_agree():
    legacy, _ = study.load_study(str(CONFIGS / "hptuning_config.yaml"))
    vertex, document = study.load_study(str(CONFIGS / "vertex_hpt.yaml"))
    assert legacy == vertex
    assert study.to_vertex(legacy) == document
    assert (legacy.goal, legacy.metric, legacy.max_trials, legacy.parallel_trials) == ("MAXIMIZE", "accuracy", 4, 2)
    assert [(p.name, p.type, p.min_value, p.max_value, p.scale) for p in legacy.parameters] == [
        (name, "DOUBLE", 0.1, 0.5, "UNIT_REVERSE_LOG_SCALE") for name in ("dropout-one", "dropout-two")
    ]


def _legacy(**hyperparameters):
    return {"trainingInput": {"hyperparameters": hyperparameters}}


def test_convert_handles_every_type_scale_algorithm_and_stopping(tmp_path):
    legacy = _legacy(
        goal="MINIMIZE",
        hyperparameterMetricTag="loss",
        maxTrials=10,
        maxParallelTrials=3,
        maxFailedTrials=2,
        algorithm="BAYESIAN_OPTIMIZATION",
        enableTrialEarlyStopping=True,
        params=[
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
    )
    path = tmp_path / "legacy.yaml"
    path.write_text(yaml.safe_dump(legacy))
    result = run_here("tune", ["convert", str(path)], check=True)
    vertex = yaml.safe_load(result.stdout)
    spec = vertex["studySpec"]
    assert spec["metrics"] == [{"metricId": "loss", "goal": "MINIMIZE"}]
    # Vertex's Bayesian default; early stopping is the median rule; the metric is the last measurement.
    assert spec["algorithm"] == "ALGORITHM_UNSPECIFIED" and spec["measurementSelectionType"] == "LAST_MEASUREMENT"
    assert spec["medianAutomatedStoppingSpec"] == {"useElapsedDuration": False}
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
    assert study.study_from_vertex(vertex) == study.study_from_legacy(legacy)  # nothing lost either way
    spec["measurementSelectionType"] = "BEST_MEASUREMENT"
    assert study.study_from_vertex(vertex).measurement_selection == "BEST_MEASUREMENT"


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"algorithm": "GRID_SEARCH"},
            "GRID_SEARCH takes only DISCRETE, CATEGORICAL and INTEGER parameters; x is DOUBLE",
        ),
        ({"decayCurveStoppingSpec": {"useElapsedDuration": False}}, "decayCurveStoppingSpec is not supported"),
        ({"measurementSelectionType": "MEDIAN"}, "measurementSelectionType must be one of"),
    ],
)
def test_what_a_local_study_cannot_do_is_one_line(change, message, tmp_path):
    config = {
        "studySpec": {
            "metrics": [{"metricId": "accuracy", "goal": "MAXIMIZE"}],
            "parameters": [{"parameterId": "x", "doubleValueSpec": {"minValue": 0.1, "maxValue": 0.5}}],
            **change,
        }
    }
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(config))
    result = run_here("tune", ["run", "--config", str(tmp_path / "study.yaml"), "--job-dir", str(tmp_path / "s")])
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and message in line


def _uniform_ks(u: np.ndarray) -> float:
    """Kolmogorov-Smirnov distance between the sample u and U(0, 1)."""
    u = np.sort(u)
    n = len(u)
    return float(max(np.max(np.arange(1, n + 1) / n - u), np.max(u - np.arange(n) / n)))


@pytest.mark.parametrize("scale", ["UNIT_LINEAR_SCALE", "UNIT_LOG_SCALE", "UNIT_REVERSE_LOG_SCALE"])
def test_random_search_follows_the_scale_formulas(scale):
    a, b = 0.1, 0.5
    parameter = study.Parameter("dropout-one", "DOUBLE", a, b, scale=scale)
    spec = study.Study("MAXIMIZE", "accuracy", (parameter,), 1000, 1, 1, algorithm="RANDOM_SEARCH")
    optimizer = optuna.create_study(sampler=search.sampler(spec, seed=0))
    x = np.array([search.suggest(optimizer.ask(), parameter) for _ in range(1000)])
    assert x.min() >= a and x.max() <= b
    # Invert Vertex's formula: each sample must come from a uniform u.
    u = {
        "UNIT_LINEAR_SCALE": (x - a) / (b - a),
        "UNIT_LOG_SCALE": np.log(x / a) / np.log(b / a),
        "UNIT_REVERSE_LOG_SCALE": 1 - np.log((a + b - x) / a) / np.log(b / a),
    }[scale]
    assert _uniform_ks(u) < 0.06  # the 1% critical value at n = 1000 is 0.052; a wrong scale gives > 0.1
    median = np.median(x)
    assert {
        "UNIT_LINEAR_SCALE": abs(median - 0.3) < 0.02,
        "UNIT_LOG_SCALE": median < 0.25,
        "UNIT_REVERSE_LOG_SCALE": median > 0.35,
    }[scale]


def test_bayesian_search_beats_random_search_on_a_cheap_objective():
    parameters = (
        study.Parameter("learning-rate", "DOUBLE", 1e-5, 1e-1, scale="UNIT_LOG_SCALE"),
        study.Parameter("dropout-one", "DOUBLE", 0.0, 0.9),
        study.Parameter("dropout-two", "DOUBLE", 0.1, 0.5, scale="UNIT_REVERSE_LOG_SCALE"),
    )

    def best_of(algorithm: str, seed: int) -> float:
        spec = study.Study("MAXIMIZE", "accuracy", parameters, 30, 1, 1, algorithm=algorithm)
        optimizer = optuna.create_study(direction="maximize", sampler=search.sampler(spec, seed))
        for _ in range(spec.max_trials):
            trial = optimizer.ask()
            lr, one, two = (search.suggest(trial, p) for p in parameters)
            optimizer.tell(trial, -((np.log10(lr) + 3) ** 2) - (4 * (one - 0.3)) ** 2 - (10 * (two - 0.45)) ** 2)
        return optimizer.best_value

    seeds = range(6)
    bayesian = np.mean([best_of("ALGORITHM_UNSPECIFIED", s) for s in seeds])
    random = np.mean([best_of("RANDOM_SEARCH", s) for s in seeds])
    assert bayesian > random, (bayesian, random)


def _run_study(args, tmp_path, train_file, *trainer):
    """A study whose driver runs in this process: its trials are processes, or lanes in this process too."""
    return run_here(
        "tune", ["run", "--job-dir", str(tmp_path / "study"), *args, "--", *tiny_args(train_file), *trainer]
    )


def _summary(path: Path) -> dict:
    return json.loads((path / "study.json").read_text())


@pytest.mark.slow
def test_local_study_runs_real_trials_and_names_the_best(tiny_pickle, tmp_path):
    result = _run_study(
        ["--config", str(CONFIGS / "hptuning_config.yaml"), "--max-trials", "2", "--seed", "1"], tmp_path, tiny_pickle
    )
    assert result.returncode == 0, result.stderr
    summary = _summary(tmp_path / "study")
    assert (summary["goal"], summary["metric"], summary["status"]) == ("MAXIMIZE", "accuracy", "SUCCEEDED")
    assert summary["algorithm"] == "ALGORITHM_UNSPECIFIED" and "TPE" in summary["search"]
    assert len(summary["trials"]) == 2
    for trial in summary["trials"]:
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
        final = read_metrics(job_dir)[-1]
        assert trial["metric"] == pytest.approx(final["val_accuracy"])
        assert [step for step, _ in trial["measurements"]] == [1, 2]
        assert "Test accuracy: " in (job_dir / "train.log").read_text()  # the trial's whole output
    assert summary["best"]["metric"] == max(t["metric"] for t in summary["trials"])
    assert f"best: trial {summary['best']['id']} accuracy=" in result.stdout
    assert "rank  trial  status" in result.stdout
    for id_ in (1, 2):
        assert f"trial {id_} epoch 1: accuracy=" in result.stdout  # each epoch as it happens
    assert "study: 2/2 done (2 succeeded, 0 stopped, 0 failed), 0 running; best trial" in result.stdout
    assert (tmp_path / "study" / "study.png").read_bytes().startswith(b"\x89PNG")


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
    summary = _summary(tmp_path / "study")
    assert summary["status"] == "FAILED" and summary["best"] is None
    assert [t["status"] for t in summary["trials"]] == ["FAILED", "FAILED"]  # stopped at maxFailedTrialCount
    assert "--batch-size/--batch_size: expected an integer, got 'thirty-two'" in summary["trials"][0]["error"]


def test_grid_search_runs_each_combination_once(tiny_pickle, tmp_path):
    config = write_study(
        tmp_path / "grid.yaml",
        [
            {"parameterId": "dropout-one", "discreteValueSpec": {"values": [0.1, 0.4]}},
            {"parameterId": "seed", "integerValueSpec": {"minValue": 1, "maxValue": 3}},
        ],
        algorithm="GRID_SEARCH",
        measurementSelectionType="BEST_MEASUREMENT",
        maxTrialCount=10,
    )
    result = _run_study(["--config", config, "--vectorize", "2"], tmp_path, tiny_pickle)
    assert result.returncode == 0, result.stderr
    summary = _summary(tmp_path / "study")
    combinations = sorted((t["params"]["dropout-one"], t["params"]["seed"]) for t in summary["trials"])
    assert combinations == [(d, s) for d in (0.1, 0.4) for s in (1, 2, 3)]  # 6 < maxTrialCount: each once
    for t in summary["trials"]:
        assert t["status"] == "SUCCEEDED" and t["metric"] == max(v for _, v in t["measurements"])


def test_median_stopping_stops_lagging_trials_in_lanes(learnable_pickle, tmp_path):
    # A grid fixes the order: four good rates complete first, then slow ones lag behind the median.
    rates = [1e-3, 3e-3, 2e-3, 5e-4, 1e-5, 7e-4, 2e-5, 1.5e-3, 1.5e-5, 3e-5, 1.2e-3, 1e-5 * 1.2]
    config = write_study(
        tmp_path / "median.yaml",
        [{"parameterId": "learning-rate", "discreteValueSpec": {"values": rates}}],
        algorithm="GRID_SEARCH",
        medianAutomatedStoppingSpec={"useElapsedDuration": False},
        maxTrialCount=12,
    )
    result = _run_study(["--config", config, "--vectorize", "4"], tmp_path, learnable_pickle, "--epochs", "3")
    assert result.returncode == 0, result.stderr
    summary = _summary(tmp_path / "study")
    assert len(summary["trials"]) == 12 and summary["early_stopping"] == "median"
    stopped = [t for t in summary["trials"] if t["status"] == "STOPPED"]
    assert stopped and all(len(t["measurements"]) < 3 for t in stopped)
    assert all(t["params"]["learning-rate"] < 1e-4 for t in stopped)
    for t in stopped:  # saved at the epoch it stopped, no model.h5
        job_dir = Path(t["job_dir"])
        assert (job_dir / "checkpoints").is_dir() and not (job_dir / "model.h5").exists()
        assert t["metric"] == t["measurements"][-1][1]  # LAST_MEASUREMENT, the default
    assert sum(len(t["measurements"]) for t in summary["trials"]) < 12 * 3
    assert "(stopping)" in result.stdout


def test_a_stopped_trial_process_saves_through_sigterm(slow_data, tmp_path):
    config = write_study(
        tmp_path / "median.yaml",
        [{"parameterId": "learning-rate", "discreteValueSpec": {"values": [1e-3, 2e-3, 3e-3, 1e-5]}}],
        algorithm="GRID_SEARCH",
        medianAutomatedStoppingSpec={},
        maxTrialCount=4,
    )
    run = ["run", "--config", config, "--job-dir", str(tmp_path / "study")]
    trainer = [*tiny_args(slow_data), "--epochs", "20"]  # epochs enough for the stop to land mid-trial
    # Median stopping compares with completed trials: the study's first three complete, as a worker reports
    # them, at 0.9 every epoch. The fourth then runs as a trial process on random data, far below them after its
    # first epoch, with nineteen epochs to go when the stop lands.
    driver = cli.open_driver(cli.build_parser().parse_args(run), trainer)
    for _ in range(3):
        trial = driver.pop()
        driver.report_now([(trial, epoch, 0.9, epoch == 20) for epoch in range(1, 21)])
        driver.tell(trial, Status.SUCCEEDED)
    result = run_here("tune", [*run, "--", *trainer])
    assert result.returncode == 0, result.stderr
    trials = _summary(tmp_path / "study")["trials"]
    assert [t["status"] for t in trials] == ["SUCCEEDED"] * 3 + ["STOPPED"]
    stopped = trials[-1]
    assert stopped["params"] == {"learning-rate": 1e-5} and "trial 4: starting" in result.stdout
    log = (tmp_path / "study" / "trial-4" / "train.log").read_text()
    assert "preempted: SIGTERM: saved epoch" in log  # it finished its epoch in flight and saved it
    assert 1 <= len(stopped["measurements"]) < 20 and not (tmp_path / "study" / "trial-4" / "model.h5").exists()


@pytest.mark.slow
def test_sigkilled_driver_rerun_ends_with_max_trials_and_keeps_finished_ones(tiny_pickle, tmp_path):
    args = ["--config", str(CONFIGS / "hptuning_config.yaml"), "--max-trials", "2", "--parallel-trials", "1"]
    command = ["run", "--job-dir", str(tmp_path / "study"), *args, "--", *tiny_args(tiny_pickle)]
    driver = run_process("tune", command, wait=False)
    summary_path = tmp_path / "study" / "study.json"

    def one_finished_and_the_next_started():
        if not summary_path.exists():
            return False
        trials = json.loads(summary_path.read_text())["trials"]
        return any(t["status"] == "SUCCEEDED" for t in trials) and (tmp_path / "study" / "trial-2").is_dir()

    wait_for(one_finished_and_the_next_started, driver)
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=30)
    finished = [t for t in json.loads(summary_path.read_text())["trials"] if t["status"] == "SUCCEEDED"]
    kept = {t["id"]: (Path(t["job_dir"]) / "model.h5").stat().st_mtime_ns for t in finished}
    again = run_here("tune", command)
    assert again.returncode == 0, again.stderr
    trials = _summary(tmp_path / "study")["trials"]
    assert sorted(t["id"] for t in trials) == [1, 2]
    assert {t["status"] for t in trials} == {"SUCCEEDED"}, [t.get("error") for t in trials]
    assert len({tuple(t["params"].values()) for t in trials}) == 2  # no parameters drawn twice
    for id_, mtime in kept.items():
        assert (tmp_path / "study" / f"trial-{id_}" / "model.h5").stat().st_mtime_ns == mtime  # not run again
        assert f"trial {id_}: " not in again.stdout


@pytest.mark.slow
def test_two_workers_share_one_study(tiny_pickle, tmp_path):
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    command = ["run", "--config", str(CONFIGS / "hptuning_config.yaml"), "--job-dir", str(tmp_path / "study")]
    # Three epochs a trial: a worker that starts a little later under load still finds slots to take.
    command += ["--storage", storage, "--max-trials", "4", "--vectorize", "2", "--", *tiny_args(tiny_pickle, 3)]
    workers = [run_process("tune", command, wait=False) for _ in range(2)]
    outputs = [w.communicate(timeout=300) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    trials = _summary(tmp_path / "study")["trials"]
    assert sorted(t["id"] for t in trials) == [1, 2, 3, 4] and {t["status"] for t in trials} == {"SUCCEEDED"}
    assert len({t["worker"] for t in trials}) == 2  # both took trials
    started = [line for out, _ in outputs for line in out.splitlines() if ": starting " in line]
    assert len(started) == 4  # each trial once, by one worker
