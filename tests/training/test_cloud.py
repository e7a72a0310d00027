"""The Vertex AI contract (output locations, job ids, tuning metric) and multi-host training."""

from __future__ import annotations

import json

import pytest

from mnist_jax.common.errors import ConfigError
from mnist_jax.training.config import parse_args
from mnist_jax.training.parallel import COORDINATOR_PORT, Cluster, find_cluster, parse_cluster_spec

from gcs import free_port
from helpers import load_final_state, max_difference, read_metrics, run_here, run_process, tiny_args


def test_vertex_run_puts_each_output_where_vertex_expects(tiny_pickle, tmp_path):
    base = tmp_path / "base"
    metric_file = tmp_path / "hypertune" / "output.metrics"
    env = {
        "AIP_MODEL_DIR": f"{base}/model/",
        "AIP_CHECKPOINT_DIR": f"{base}/checkpoints/",
        "AIP_TENSORBOARD_LOG_DIR": f"{base}/logs/",
        "CLOUD_ML_JOB_ID": "job-123",
        "CLOUD_ML_TRIAL_ID": "7",
        "CLOUD_ML_HP_METRIC_FILE": str(metric_file),
    }
    result = run_here(
        "train", [*tiny_args(tiny_pickle), "--dropout-one=0.3", "--dropout_two=0.25"], env=env, check=True
    )
    assert "Vertex AI job job-123, trial 7" in result.stdout
    assert (base / "model" / "model.h5").is_file()
    assert any(p.name.isdigit() for p in (base / "checkpoints").iterdir())
    assert list((base / "logs").glob("*/events.out.tfevents.*"))
    for name in ("config.json", "metrics.jsonl", "curves.png"):  # the job dir: the parent of AIP_MODEL_DIR
        assert (base / name).is_file(), name
    config = json.loads((base / "config.json").read_text())
    assert (config["job_id"], config["trial_id"]) == ("job-123", "7")
    assert (config["dropout_one"], config["dropout_two"]) == (0.3, 0.25)
    records = read_metrics(base)
    lines = [json.loads(line) for line in metric_file.read_text().splitlines()]
    assert [line["global_step"] for line in lines] == ["1", "2"]
    for line, record in zip(lines, records):
        assert set(line) >= {"timestamp", "trial", "accuracy", "global_step"} and line["trial"] == "7"
        assert float(line["accuracy"]) == pytest.approx(record["val_accuracy"])


def test_flags_win_over_vertex_variables(tmp_path):
    env = {
        "AIP_MODEL_DIR": "gs://b/base/model/",
        "AIP_CHECKPOINT_DIR": "gs://b/base/checkpoints/",
        "AIP_TENSORBOARD_LOG_DIR": "gs://b/base/logs/",
    }
    config = parse_args(
        ["--job-dir", str(tmp_path), "--checkpoint-dir", str(tmp_path / "ck"), "--hpt-metric-tag=acc"], env
    )
    assert config.job_dir == str(tmp_path) and config.checkpoint_dir == str(tmp_path / "ck")
    assert config.model_dir == "gs://b/base/model/" and config.tensorboard_dir == "gs://b/base/logs/"
    assert config.hpt_metric_tag == "acc"
    plain = parse_args([], {})
    assert (plain.model_dir, plain.checkpoint_dir, plain.tensorboard_dir) == (
        "./tmp/mnist_mlp",
        "./tmp/mnist_mlp/checkpoints",
        "./tmp/mnist_mlp/logs",
    )


def test_cluster_spec_parsing():
    spec = {
        "cluster": {"workerpool0": ["chief-0:2222"], "workerpool1": ["w-0:2222", "w-1:2222", "w-2:2222"]},
        "task": {"type": "workerpool1", "index": 1},
        "environment": "cloud",
    }
    assert parse_cluster_spec(json.dumps(spec)) == Cluster(f"chief-0:{COORDINATOR_PORT}", 4, 2)
    spec["task"] = {"type": "workerpool0", "index": 0}
    assert parse_cluster_spec(json.dumps(spec)).process_id == 0
    single = {"cluster": {"workerpool0": ["localhost:2222"]}, "task": {"type": "workerpool0", "index": 0}}
    assert find_cluster(parse_args([], {}), {"CLUSTER_SPEC": json.dumps(single)}) is None  # one process: nothing
    with pytest.raises(ConfigError, match="not a Vertex AI cluster spec"):
        parse_cluster_spec('{"cluster": {}}')
    with pytest.raises(ConfigError, match="not a training worker pool"):
        parse_cluster_spec(json.dumps({**spec, "task": {"type": "workerpool2", "index": 0}}))
    explicit = parse_args(["--coordinator-address", "10.0.0.1:1234", "--num-processes", "2", "--process-id", "1"], {})
    assert find_cluster(explicit, {"CLUSTER_SPEC": json.dumps(spec)}) == Cluster("10.0.0.1:1234", 2, 1)
    with pytest.raises(ConfigError, match="go together"):
        parse_args(["--num-processes", "2"], {})
    with pytest.raises(ConfigError, match="must be below"):
        parse_args(["--coordinator-address", "h:1", "--num-processes", "2", "--process-id", "2"], {})


def _two_processes(module: str, args: list[str]) -> tuple[list[int], list[tuple[str, str]]]:
    """`python -m mnist_jax.<module> ARGS` as processes 0 and 1 of a two-process job on 127.0.0.1: their exit
    statuses and outputs."""
    cluster = ["--coordinator-address", f"127.0.0.1:{free_port()}", "--num-processes", "2", "--process-id"]
    processes = [run_process(module, [*args, *cluster, str(i)], wait=False) for i in range(2)]
    outputs = [p.communicate(timeout=240) for p in processes]
    return [p.returncode for p in processes], outputs


def test_two_processes_train_the_same_model_as_one(tiny_pickle, tmp_path):
    args = ["--train-file", str(tiny_pickle), "--epochs", "1", "--batch-size", "32", "--dropout-one", "0.3"]
    codes, outputs = _two_processes("train", [*args, "--job-dir", str(tmp_path / "two")])
    assert codes == [0, 0], outputs
    assert "Training on 2 cpu device(s), 2 process(es)" in outputs[0][0]
    assert "Epoch 1/1" in outputs[0][0] and "Epoch" not in outputs[1][0]  # only process 0 reports
    run_here("train", [*args, "--job-dir", str(tmp_path / "one")], check=True)
    two, one = load_final_state(tmp_path / "two"), load_final_state(tmp_path / "one")
    assert max_difference(two.params, one.params) < 1e-5


def test_lanes_across_two_processes_refuse_in_one_line(tiny_pickle, tmp_path):
    study = tmp_path / "study.yaml"
    study.write_text(
        "studySpec:\n  metrics: [{metricId: accuracy, goal: MAXIMIZE}]\n"
        "  parameters: [{parameterId: seed, discreteValueSpec: {values: [1, 2]}}]\n"
        "  algorithm: GRID_SEARCH\nmaxTrialCount: 2\n"
    )
    tune = ["run", "--config", str(study), "--job-dir", str(tmp_path / "s")]
    codes, outputs = _two_processes("tune", [*tune, "--vectorize", "2", "--", "--train-file", str(tiny_pickle)])
    assert codes == [2, 2], outputs
    for _, stderr in outputs:
        assert stderr.strip() == (
            "error: --vectorize 2: lanes train in one process; with 2 processes, "
            "run each trial as a process of its own (--vectorize 1)"
        )
