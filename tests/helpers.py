"""Test helpers, imported by the tests (not through conftest): datasets, entry points run in this process or in
subprocesses, directories filled once per run, checkpoint states, tree differences, metrics.jsonl and study configs."""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]


def make_arrays(n_train: int = 100, n_test: int = 40, seed: int = 0, flat: bool = False):
    """Random uint8 images with labels 0..9, in the seed's nesting."""
    rng = np.random.default_rng(seed)
    shape = (784,) if flat else (28, 28)

    def split(n):
        return rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)

    return split(n_train), split(n_test)


def make_learnable(n_train: int = 600, n_test: int = 200, seed: int = 0):
    """Images whose label is the one of ten pixel bands that is brighter: learnt in an epoch at a good
    learning rate and not at a tiny one, so the rate shows in the accuracy."""
    rng = np.random.default_rng(seed)

    def split(n):
        y = rng.integers(0, 10, n).astype(np.uint8)
        x = rng.integers(0, 128, (n, 784), dtype=np.uint8)
        for label in range(10):
            x[y == label, label * 78 : (label + 1) * 78] += 100
        return x.reshape(n, 28, 28), y

    return split(n_train), split(n_test)


def trainer_env(devices: int = 1, env: dict | None = None) -> dict:
    """The environment of a trainer subprocess with `devices` simulated CPU devices.

    The tuning metric goes to a throwaway file unless `env` says where.
    """
    return {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
        "CLOUD_ML_HP_METRIC_FILE": os.devnull,
        **(env or {}),
    }


def tiny_args(train_file, epochs: int = 2, batch_size: int = 32) -> list[str]:
    """Trainer flags for a short run on a tiny dataset."""
    return ["--train-file", str(train_file), "--epochs", str(epochs), "--batch-size", str(batch_size)]


def run_here(
    module: str, args: list[str], env: dict | None = None, check: bool = False, stdin: bytes | None = None
) -> subprocess.CompletedProcess:
    """`python -m mnist_jax.<module> ARGS` run by the module's `main` in this process (one device), with the exit
    status and output a process gives (bytes when `stdin` is): for tests where a process would add only its
    start-up (imports, compiles). `check` makes a non-zero status an AssertionError that shows the output.

    The tuning metric goes to a throwaway file unless `env` says where.
    """
    main = importlib.import_module(f"mnist_jax.{module}").main
    out, err = io.StringIO(), io.StringIO()
    saved_stdin = sys.stdin
    if stdin is not None:
        sys.stdin = io.TextIOWrapper(io.BytesIO(stdin))
    try:
        with mock.patch.dict(os.environ, {"CLOUD_ML_HP_METRIC_FILE": os.devnull, **(env or {})}):
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    status = main(list(args))
                except SystemExit as e:  # --help, and argparse's usage errors
                    status = e.code if isinstance(e.code, int) else 2
    finally:
        sys.stdin = saved_stdin
    stdout, stderr = out.getvalue(), err.getvalue()
    if stdin is not None:
        stdout, stderr = stdout.encode(), stderr.encode()
    result = subprocess.CompletedProcess([module, *args], status, stdout, stderr)
    if check and status != 0:
        raise AssertionError(f"{module} failed ({status}):\n{stdout}\n{stderr}")
    return result


def run_process(
    module: str,
    args: list[str],
    *,
    devices: int = 1,
    env: dict | None = None,
    timeout: float = 300,
    check: bool = False,
    stdin: bytes | None = None,
    wait: bool = True,
    **popen,
) -> subprocess.CompletedProcess | subprocess.Popen:
    """`python -m mnist_jax.<module> ARGS` in a fresh process with `devices` simulated CPU devices and the
    environment of `trainer_env(devices, env)`, run from the repository's root.

    wait=True: runs it to completion (at most `timeout` seconds) and returns the CompletedProcess, its output
    captured (text, or bytes when `stdin`, the bytes fed to it, is given); `check` makes a non-zero status an
    AssertionError that shows the output.
    wait=False: starts it in the background and returns the Popen; `timeout`, `check` and `stdin` do not apply.
    In both, stdout and stderr are text pipes unless `popen` (subprocess.Popen's keywords) says otherwise.
    """
    command = [sys.executable, "-m", f"mnist_jax.{module}", *args]
    if not wait:
        if stdin is not None:
            raise TypeError("run_process: stdin is fed only to a process it waits for (wait=True)")
        options = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **popen}
        return subprocess.Popen(command, cwd=REPO, env=trainer_env(devices, env), **options)
    options = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": stdin is None, **popen}
    result = subprocess.run(command, cwd=REPO, env=trainer_env(devices, env), input=stdin, timeout=timeout, **options)
    if check and result.returncode != 0:
        raise AssertionError(f"{module} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def load_final_state(job_dir, hidden_units: int = 512):
    """The newest checkpoint's TrainState in `job_dir` (local or gs://), restored onto this process."""
    import jax

    from mnist_jax.model.mlp import MLP
    from mnist_jax.training import checkpoint, parallel
    from mnist_jax.training.steps import create_train_state

    ckpt = checkpoint.Checkpointer(checkpoint.manager_path(f"{job_dir}/checkpoints"), keep=3)
    abstract = jax.eval_shape(lambda: create_train_state(MLP(hidden_units), jax.random.PRNGKey(0), 0.001))
    state = ckpt.restore_latest(abstract, parallel.replicated(parallel.make_mesh()), {"hidden_units": hidden_units})
    ckpt.close()
    return state


def assert_states_equal(a, b) -> None:
    """Bit-for-bit equality of two TrainStates (params, optimizer state, step, epoch, rng)."""
    import jax

    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


EPOCHS = 8
STEPS_PER_EPOCH = 32


def job_args(train_file, job_dir, epochs=EPOCHS) -> list[str]:
    """The preemption tests' job: seeded, saved every epoch."""
    return [*tiny_args(train_file, epochs), "--job-dir", str(job_dir), "--seed", "5", "--checkpoint-every", "1"]


def assert_refused(result: subprocess.CompletedProcess, message: str) -> None:
    """An entry point's refusal: exit status 2, `message` in the error, no traceback."""
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def wait_for(predicate, process, timeout=120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, f"trainer exited early: {process.communicate()}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def max_difference(a, b) -> float:
    """The largest absolute difference between two trees' leaves (params, states)."""
    import jax

    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def read_metrics(job_dir) -> list[dict]:
    """A job dir's metrics.jsonl (local or gs://), one record per epoch."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(f"{job_dir}/metrics.jsonl")
    return [json.loads(line) for line in fs.cat_file(path).decode().splitlines()]


def write_study(path: Path, parameters: list, metric: str = "accuracy", **spec) -> str:
    """A Vertex study config at `path` (counts such as maxTrialCount among `spec`); returns the path."""
    counts = {k: spec.pop(k) for k in ("maxTrialCount", "parallelTrialCount", "maxFailedTrialCount") if k in spec}
    config = {
        "studySpec": {"metrics": [{"metricId": metric, "goal": "MAXIMIZE"}], "parameters": parameters, **spec},
        **counts,
    }
    path.write_text(yaml.safe_dump(config))
    return str(path)


def once(tmp_path_factory, worker_id: str, name: str, make: Callable[[Path], object]) -> Path:
    """A directory that `make` fills once per test run, however many xdist workers ask for it: the first to take
    its lock fills it, the others wait and read it (the tests only read it)."""
    if worker_id == "master":  # no xdist: nothing to share
        path = tmp_path_factory.mktemp(name)
        make(path)
        return path
    root = tmp_path_factory.getbasetemp().parent  # the workers' common base
    path, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)  # a worker that failed while filling it
            path.mkdir()
            make(path)
            done.touch()
    return path
