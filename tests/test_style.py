"""The code style: `ruff check` and `ruff format --check` pass over the package, the tests and the scripts, with the
settings in pyproject.toml."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from helpers import REPO

PATHS = ["mnist_jax", "tests", "scripts"]


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=" ".join)
def test_ruff_passes(command):
    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff (PyPI ruff, in the test extra) is not installed")
    # --no-cache: nothing written into the checkout, and no cache shared by the suite's two workers.
    result = subprocess.run(
        [sys.executable, "-m", "ruff", *command, "--no-cache", *PATHS],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"ruff {' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
