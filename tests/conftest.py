"""Shared fixtures: tiny datasets on disk and a runner for real trainer subprocesses."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def make_arrays(n_train: int = 100, n_test: int = 40, seed: int = 0, flat: bool = False):
    """Random uint8 images with labels 0..9, in the seed's nesting."""
    rng = np.random.default_rng(seed)
    shape = (784,) if flat else (28, 28)

    def split(n):
        return rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)

    return split(n_train), split(n_test)


@pytest.fixture
def tiny_pickle(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.pkl"
    path.write_bytes(pickle.dumps(make_arrays()))
    return path


def run_trainer(args: list[str], devices: int = 1, env: dict | None = None, timeout: float = 240,
                check: bool = True) -> subprocess.CompletedProcess:
    """Runs `python -m mnist_jax.train` in a fresh process with `devices` simulated CPU devices."""
    full_env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
                "JAX_PLATFORMS": "cpu", **(env or {})}
    result = subprocess.run([sys.executable, "-m", "mnist_jax.train", *args], cwd=REPO, env=full_env,
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"trainer failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result
