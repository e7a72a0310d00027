"""Checkpoints: resume after SIGKILL and SIGTERM bit for bit, extra epochs, shape changes, elastic restore."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import jax
import numpy as np

from conftest import (
    EPOCHS,
    STEPS_PER_EPOCH,
    assert_states_equal,
    job_args,
    load_final_state,
    run_trainer,
    start_trainer,
    wait_for,
)


def committed(job_dir: Path, epoch: int) -> bool:
    # Locally, Orbax renames a finished step's temporary directory to its step number.
    return (job_dir / "checkpoints" / str(epoch * STEPS_PER_EPOCH)).is_dir()


def epochs_logged(job_dir: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (job_dir / "metrics.jsonl").read_text().splitlines()]


def test_sigkill_twice_then_resume_is_bit_identical(slow_data, uninterrupted, tmp_path):
    job_dir = tmp_path / "job"
    for kill_after_epoch in (1, 3):
        process = start_trainer(job_args(slow_data, job_dir))
        # Kill the moment a checkpoint commits: the next epoch and, soon, its async save are in flight.
        wait_for(lambda epoch=kill_after_epoch: committed(job_dir, epoch), process)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
        assert epochs_logged(job_dir)[-1] < EPOCHS
    result = run_trainer(job_args(slow_data, job_dir))
    assert "Resuming from epoch " in result.stdout
    assert epochs_logged(job_dir) == list(range(1, EPOCHS + 1))  # nothing lost, nothing twice
    assert_states_equal(load_final_state(job_dir), uninterrupted)


def test_sigterm_saves_and_exits_then_resumes(slow_data, uninterrupted, tmp_path):
    job_dir = tmp_path / "job"
    process = start_trainer(job_args(slow_data, job_dir))
    wait_for(lambda: committed(job_dir, 1), process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143
    assert "preempted: SIGTERM: saved epoch " in stderr and "Traceback" not in stderr
    saved_epoch = int(stderr.split("saved epoch ")[1].split()[0])
    assert saved_epoch < EPOCHS and committed(job_dir, saved_epoch)
    result = run_trainer(job_args(slow_data, job_dir))
    assert f"Resuming from epoch {saved_epoch} (step {saved_epoch * STEPS_PER_EPOCH})" in result.stdout
    assert_states_equal(load_final_state(job_dir), uninterrupted)


def test_more_epochs_trains_only_the_extra_ones(tiny_pickle, tmp_path):
    args = ["--train-file", str(tiny_pickle), "--job-dir", str(tmp_path), "--batch-size", "32"]
    run_trainer([*args, "--epochs", "1"])
    result = run_trainer([*args, "--epochs", "3"])
    assert "Resuming from epoch 1 (step 4)" in result.stdout
    assert [line.split(" - ")[0] for line in result.stdout.splitlines() if line.startswith("Epoch")] == [
        "Epoch 2/3",
        "Epoch 3/3",
    ]
    assert epochs_logged(tmp_path) == [1, 2, 3]
    again = run_trainer([*args, "--epochs", "3"])  # finished: reports, trains nothing
    assert "Epoch " not in again.stdout.replace("Resuming from epoch", "")
    assert "Test accuracy: " in again.stdout and epochs_logged(tmp_path) == [1, 2, 3]


def test_keep_checkpoints(tiny_pickle, tmp_path):
    run_trainer(
        [
            "--train-file",
            str(tiny_pickle),
            "--job-dir",
            str(tmp_path),
            "--batch-size",
            "32",
            "--epochs",
            "5",
            "--keep-checkpoints",
            "2",
            "--checkpoint-every",
            "2",
        ]
    )
    # Epochs 2 and 4 by the interval, 5 as the last; the newest two are kept.
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [16, 20]


def test_changed_model_width_is_a_clear_error(tiny_pickle, tmp_path):
    args = ["--train-file", str(tiny_pickle), "--job-dir", str(tmp_path), "--batch-size", "32", "--epochs", "2"]
    run_trainer([*args, "--hidden-units", "64"])
    result = run_trainer(args, check=False)
    assert result.returncode == 2
    assert "hidden_units 64 in the checkpoint vs 512 now" in result.stderr
    assert "Traceback" not in result.stderr


def test_checkpoint_from_four_devices_resumes_on_one(tiny_pickle, tmp_path):
    args = ["--train-file", str(tiny_pickle), "--batch-size", "32"]
    run_trainer([*args, "--job-dir", str(tmp_path / "elastic"), "--epochs", "1"], devices=4)
    result = run_trainer([*args, "--job-dir", str(tmp_path / "elastic"), "--epochs", "2"], devices=1)
    assert "Resuming from epoch 1 (step 4)" in result.stdout
    run_trainer([*args, "--job-dir", str(tmp_path / "single"), "--epochs", "2"], devices=1)
    elastic, single = load_final_state(tmp_path / "elastic"), load_final_state(tmp_path / "single")
    diff = max(
        float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(elastic.params), jax.tree.leaves(single.params))
    )
    assert diff < 1e-5
