"""gs:// end to end against a real fake-gcs-server on 127.0.0.1: reads, writes, resume, faults."""

from __future__ import annotations

import gzip
import json
import pickle
import signal

import fsspec
import numpy as np
import pytest

from mnist_jax.common.errors import DataError
from mnist_jax.data import dataset as data
from mnist_jax.model import keras_h5

from gcs import FaultyProxy
from helpers import (
    EPOCHS,
    REPO,
    STEPS_PER_EPOCH,
    assert_states_equal,
    job_args,
    load_final_state,
    make_arrays,
    read_metrics,
    run_here,
    run_process,
    tiny_args,
    wait_for,
)


def _upload(path: str, payload: bytes) -> None:
    fsspec.filesystem("gs").pipe_file(path, payload)


def _exists_uncached(path: str) -> bool:
    fs = fsspec.filesystem("gs")
    fs.invalidate_cache()  # gcsfs caches listings; another process is writing
    return fs.exists(path)


def _objects(prefix: str) -> list[str]:
    return fsspec.filesystem("gs").find(prefix)


def test_reads_plain_and_gzip_pickles_from_gcs(gcs_env):
    arrays = make_arrays()
    payload = pickle.dumps(arrays)
    _upload("bucket/read/mnist.pkl", payload)
    _upload("bucket/read/mnist.pkl.gz", gzip.compress(payload))
    for uri in ("gs://bucket/read/mnist.pkl", "gs://bucket/read/mnist.pkl.gz"):
        dataset = data.load(uri)
        np.testing.assert_array_equal(dataset.x_train, arrays[0][0].reshape(-1, 784))
        np.testing.assert_array_equal(dataset.y_test, arrays[1][1])
    with pytest.raises(DataError, match="train file not found: gs://bucket/read/nope.pkl"):
        data.load("gs://bucket/read/nope.pkl")


def test_train_on_gcs_then_resume_with_more_epochs(gcs_env):
    _upload("bucket/e2e/mnist.pkl.gz", gzip.compress(pickle.dumps(make_arrays())))
    args = ["--train-file", "gs://bucket/e2e/mnist.pkl.gz", "--job-dir", "gs://bucket/e2e/job", "--batch-size", "32"]
    run_here("train", [*args, "--epochs", "2"], check=True)
    objects = _objects("bucket/e2e/job")
    assert {
        "bucket/e2e/job/config.json",
        "bucket/e2e/job/metrics.jsonl",
        "bucket/e2e/job/model.h5",
        "bucket/e2e/job/curves.png",
    } <= set(objects)
    assert any(o.startswith("bucket/e2e/job/logs/") and "events.out.tfevents" in o for o in objects)
    assert any(o.startswith("bucket/e2e/job/checkpoints/8/") and o.endswith("commit_success.txt") for o in objects)
    fs = fsspec.filesystem("gs")
    assert json.loads(fs.cat_file("bucket/e2e/job/config.json"))["train_file"] == "gs://bucket/e2e/mnist.pkl.gz"

    params, rates = keras_h5.read_model("gs://bucket/e2e/job/model.h5")
    assert rates == (0.2, 0.2) and params["dense"]["kernel"].shape == (784, 512)

    result = run_here("train", [*args, "--epochs", "3"], check=True)
    assert "Resuming from epoch 2 (step 8)" in result.stdout
    assert [r["epoch"] for r in read_metrics("gs://bucket/e2e/job")] == [1, 2, 3]


def test_sigkill_with_gcs_job_dir_resumes_bit_identical(gcs_env, slow_data, uninterrupted):
    job_dir = "gs://bucket/killed/job"
    process = run_process("train", job_args(slow_data, job_dir), env=gcs_env, wait=False)
    # On GCS, Orbax marks a finished step with commit_success.txt.
    marker = f"bucket/killed/job/checkpoints/{STEPS_PER_EPOCH}/commit_success.txt"
    wait_for(lambda: _exists_uncached(marker), process)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL
    result = run_here("train", job_args(slow_data, job_dir), check=True)
    assert "Resuming from epoch " in result.stdout
    assert [r["epoch"] for r in read_metrics(job_dir)] == list(range(1, EPOCHS + 1))
    assert_states_equal(load_final_state(job_dir), uninterrupted)


@pytest.mark.slow
def test_transient_faults_are_retried(gcs_env, fake_gcs):
    _upload("bucket/faults/mnist.pkl.gz", gzip.compress(pickle.dumps(make_arrays())))
    proxy = FaultyProxy(fake_gcs.port, plan=("503", "reset"))
    try:
        result = run_process(
            "train",
            [
                "--train-file",
                "gs://bucket/faults/mnist.pkl.gz",
                "--job-dir",
                "gs://bucket/faults/job",
                "--batch-size",
                "32",
                "--epochs",
                "2",
            ],
            env=fake_gcs.env(proxy.url),
            timeout=240,
            check=True,
        )
    finally:
        proxy.shutdown()
    # Reads (GET) and writes (POST uploads) each met a 503 and a dropped connection, and were retried.
    for method in ("GET", "POST"):
        assert proxy.injected[f"{method} 503"] >= 1 and proxy.injected[f"{method} reset"] == 1, proxy.injected
    assert "Test accuracy: " in result.stdout
    assert [r["epoch"] for r in read_metrics("gs://bucket/faults/job")] == [1, 2]
    assert any(o.endswith("checkpoints/8/commit_success.txt") for o in _objects("bucket/faults/job"))


def test_missing_bucket_is_a_one_line_error(gcs_env, tiny_pickle):
    result = run_here("train", ["--train-file", str(tiny_pickle), "--job-dir", "gs://no-such-bucket/job"])
    assert result.returncode == 2
    assert (
        result.stderr.strip().splitlines()[-1]
        == "error: cannot write gs://no-such-bucket/job/config.json: no such bucket"
    )
    assert "Traceback" not in result.stderr


def test_permission_denied_is_a_one_line_error(fake_gcs, tiny_pickle):
    proxy = FaultyProxy(fake_gcs.port, plan=("403",) * 1000)  # every request: 403 Forbidden
    try:
        result = run_process(
            "train",
            ["--train-file", str(tiny_pickle), "--job-dir", "gs://bucket/forbidden/job"],
            env=fake_gcs.env(proxy.url),
            timeout=120,
        )
    finally:
        proxy.shutdown()
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    # The first access to the job dir, looking for a checkpoint to resume, is the one refused.
    assert line.startswith("error: storage error on gs://bucket/forbidden/job/checkpoints: Forbidden")


def test_a_study_with_a_gcs_job_dir(gcs_env, tiny_pickle, tmp_path):
    config = str(REPO / "configs" / "hptuning_config.yaml")
    args = ["run", "--config", config, "--job-dir", "gs://bucket/study", "--max-trials", "2", "--vectorize", "2"]
    needs_storage = run_here("tune", args)
    assert needs_storage.returncode == 2 and "a gs:// job dir needs --storage" in needs_storage.stderr
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    result = run_here("tune", [*args, "--storage", storage, "--", *tiny_args(tiny_pickle)])
    assert result.returncode == 0, result.stderr
    fs = fsspec.filesystem("gs")
    summary = json.loads(fs.cat_file("bucket/study/study.json"))
    assert [t["status"] for t in summary["trials"]] == ["SUCCEEDED", "SUCCEEDED"]
    objects = set(_objects("bucket/study"))
    for trial in (1, 2):
        assert {f"bucket/study/trial-{trial}/{name}" for name in ("model.h5", "train.log", "metrics.jsonl")} <= objects
    assert "bucket/study/study.png" in objects
