"""A job dir that cannot be one is refused in one line before any heavy work: no data read, no model built."""

from __future__ import annotations

import pytest

from helpers import run_here, tiny_args, write_study


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a job dir")
    return path


def _refused_early(result, line: str) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == line  # one line, no traceback
    assert "train samples" not in result.stdout and "Model:" not in result.stdout  # before the data was read


def test_train_refuses_a_job_dir_that_is_a_file_or_lies_under_one(tiny_pickle, a_file):
    result = run_here("train", [*tiny_args(tiny_pickle), "--job-dir", str(a_file)])
    _refused_early(result, f"error: --job-dir {a_file} is a file, not a directory")
    result = run_here("train", [*tiny_args(tiny_pickle), "--job-dir", str(a_file / "job")])
    _refused_early(result, f"error: --job-dir {a_file / 'job'}: {a_file} is a file, not a directory")
    assert a_file.read_text() == "not a job dir"


def test_train_refuses_fewer_epochs_than_the_job_dir_holds_before_reading_the_data(tiny_pickle, tmp_path):
    args = [*tiny_args(tiny_pickle, epochs=2), "--job-dir", str(tmp_path / "job")]
    run_here("train", args, check=True)
    # The data it names is gone: a refusal that read it first would say so instead.
    result = run_here("train", [*args, "--epochs", "1", "--train-file", str(tmp_path / "missing.pkl")])
    _refused_early(
        result,
        f"error: {tmp_path / 'job'} holds a job trained for 2 epochs, more than --epochs 1; "
        "use a new --job-dir, or --epochs 2 or more",
    )


@pytest.mark.parametrize("where", ["file", "under a file", "unwritable"])
def test_tune_run_refuses_a_job_dir_it_cannot_make_in_one_line(where, tiny_pickle, tmp_path, a_file):
    job_dir = {"file": a_file, "under a file": a_file / "study", "unwritable": "/proc/nope"}[where]
    study = write_study(tmp_path / "s.yaml", [{"parameterId": "dropout-one", "doubleValueSpec": {
        "minValue": 0.1, "maxValue": 0.5}}], maxTrialCount=1)  # fmt: skip
    result = run_here("tune", ["run", "--config", study, "--job-dir", str(job_dir), "--", *tiny_args(tiny_pickle)])
    expected = {
        "file": f"error: --job-dir {a_file} is a file, not a directory",
        "under a file": f"error: --job-dir {job_dir}: {a_file} is a file, not a directory",
        "unwritable": "error: --job-dir /proc/nope: cannot create it: No such file or directory",
    }[where]
    assert result.returncode == 2 and result.stderr.strip() == expected, result.stderr
