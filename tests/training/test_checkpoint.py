"""Checkpoints: resume after SIGKILL and SIGTERM bit for bit, extra epochs, shape changes, four devices training
what one does and their checkpoint resuming on one, and faults: a full disk, damaged checkpoints, an unwritable
job dir."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import (
    EPOCHS,
    REPO,
    STEPS_PER_EPOCH,
    assert_refused,
    assert_states_equal,
    job_args,
    load_final_state,
    max_difference,
    read_metrics,
    run_here,
    run_process,
    trainer_env,
    wait_for,
)


def committed(job_dir: Path, epoch: int) -> bool:
    # Locally, Orbax renames a finished step's temporary directory to its step number.
    return (job_dir / "checkpoints" / str(epoch * STEPS_PER_EPOCH)).is_dir()


def epochs_logged(job_dir: Path) -> list[int]:
    return [r["epoch"] for r in read_metrics(job_dir)]


def test_sigkill_twice_then_resume_is_bit_identical(slow_data, uninterrupted, tmp_path):
    job_dir = tmp_path / "job"
    for kill_after_epoch in (1, 3):
        process = run_process("train", job_args(slow_data, job_dir), wait=False)
        # Kill the moment a checkpoint commits: the next epoch and, soon, its async save are in flight.
        wait_for(lambda epoch=kill_after_epoch: committed(job_dir, epoch), process)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
        assert epochs_logged(job_dir)[-1] < EPOCHS
    result = run_here("train", job_args(slow_data, job_dir), check=True)
    assert "Resuming from epoch " in result.stdout
    assert epochs_logged(job_dir) == list(range(1, EPOCHS + 1))  # nothing lost, nothing twice
    assert_states_equal(load_final_state(job_dir), uninterrupted)


def test_sigterm_saves_and_exits_then_resumes(slow_data, uninterrupted, tmp_path):
    job_dir = tmp_path / "job"
    process = run_process("train", job_args(slow_data, job_dir), wait=False)
    wait_for(lambda: committed(job_dir, 1), process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143
    assert "preempted: SIGTERM: saved epoch " in stderr and "Traceback" not in stderr
    saved_epoch = int(stderr.split("saved epoch ")[1].split()[0])
    assert saved_epoch < EPOCHS and committed(job_dir, saved_epoch)
    result = run_here("train", job_args(slow_data, job_dir), check=True)
    assert f"Resuming from epoch {saved_epoch} (step {saved_epoch * STEPS_PER_EPOCH})" in result.stdout
    assert_states_equal(load_final_state(job_dir), uninterrupted)


def test_more_epochs_trains_only_the_extra_ones(tiny_pickle, tmp_path):
    args = ["--train-file", str(tiny_pickle), "--job-dir", str(tmp_path), "--batch-size", "32"]
    run_here("train", [*args, "--epochs", "1"], check=True)
    result = run_here("train", [*args, "--epochs", "3"], check=True)
    assert "Resuming from epoch 1 (step 4)" in result.stdout
    assert [line.split(" - ")[0] for line in result.stdout.splitlines() if line.startswith("Epoch")] == [
        "Epoch 2/3",
        "Epoch 3/3",
    ]
    assert epochs_logged(tmp_path) == [1, 2, 3]
    again = run_here("train", [*args, "--epochs", "3"], check=True)  # finished: reports, trains nothing
    assert "Epoch " not in again.stdout.replace("Resuming from epoch", "")
    assert "Test accuracy: " in again.stdout and epochs_logged(tmp_path) == [1, 2, 3]


def test_keep_checkpoints(tiny_pickle, tmp_path):
    run_here(
        "train",
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
        ],
        check=True,
    )
    # Epochs 2 and 4 by the interval, 5 as the last; the newest two are kept.
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [16, 20]


def test_changed_model_width_is_a_clear_error(tiny_pickle, tmp_path):
    args = ["--train-file", str(tiny_pickle), "--job-dir", str(tmp_path), "--batch-size", "32", "--epochs", "2"]
    run_here("train", [*args, "--hidden-units", "64"], check=True)
    result = run_here("train", args)
    assert_refused(result, "hidden_units 64 in the checkpoint vs 512 now")


def test_four_devices_train_what_one_does_and_their_checkpoint_resumes_on_one(tiny_pickle, tmp_path):
    # 100 examples, batch 32: four steps, the last one padded, dropout on.
    args = ["--train-file", str(tiny_pickle), "--batch-size", "32", "--dropout-one", "0.3"]
    four = run_process(
        "train", [*args, "--job-dir", str(tmp_path / "elastic"), "--epochs", "1"], devices=4, timeout=240, check=True
    )
    assert "Training on 4 cpu device(s)" in four.stdout
    run_here("train", [*args, "--job-dir", str(tmp_path / "single"), "--epochs", "1"], check=True)
    elastic, single = load_final_state(tmp_path / "elastic"), load_final_state(tmp_path / "single")
    assert int(elastic.step) == int(single.step) == 4
    assert max_difference(elastic.params, single.params) < 1e-5
    # Epoch 2 of each on one device: the four devices' checkpoint resumes there.
    result = run_here("train", [*args, "--job-dir", str(tmp_path / "elastic"), "--epochs", "2"], check=True)
    assert "Resuming from epoch 1 (step 4)" in result.stdout
    run_here("train", [*args, "--job-dir", str(tmp_path / "single"), "--epochs", "2"], check=True)
    elastic, single = load_final_state(tmp_path / "elastic"), load_final_state(tmp_path / "single")
    assert max_difference(elastic.params, single.params) < 1e-5


def _can_mount_a_tmpfs() -> bool:
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
    return shutil.which("unshare") is not None and probe.returncode == 0


def test_full_disk_stops_within_an_epoch_and_resumes_once_there_is_room(slow_data, uninterrupted, tmp_path):
    if not _can_mount_a_tmpfs():
        pytest.skip("needs unshare (util-linux) and user namespaces to mount a 6 MB file system")
    small, copied = tmp_path / "small", tmp_path / "copied"
    small.mkdir()
    # A raw subprocess, not run_process: the trainer runs inside an `unshare` shell that mounts the small file
    # system first and copies the job dir out of that mount namespace after.
    command = " ".join([sys.executable, "-m", "mnist_jax.train", *job_args(slow_data, small / "job")])
    # In a private mount namespace: a 6 MB file system holds one checkpoint (4.7 MB) but not two.
    script = (
        f"mount -t tmpfs -o size=6m tmpfs {small} && {command}; status=$?; cp -a {small}/job {copied}; exit $status"
    )
    result = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script],
        cwd=REPO,
        env=trainer_env(1),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line == (
        f"error: saving checkpoint step {2 * STEPS_PER_EPOCH} to {small}/job/checkpoints failed: No space left on "
        f"device; the newest good checkpoint is step {STEPS_PER_EPOCH} (rerun the same command, once the cause is "
        "fixed, to resume)"
    )
    # The failed save of epoch 2 (on the background writer) stopped the job at the end of epoch 3 at the latest.
    assert epochs_logged(copied) in ([1, 2], [1, 2, 3])
    assert not (copied / "model.h5").exists()
    result = run_here("train", job_args(slow_data, copied), check=True)
    assert f"Resuming from epoch 1 (step {STEPS_PER_EPOCH})" in result.stdout
    assert_states_equal(load_final_state(copied), uninterrupted)


def _damage(job_dir: Path, step: int, part: str) -> None:
    if part == "data":  # every array file of the checkpoint cut short
        for path in (job_dir / "checkpoints" / str(step) / "state").rglob("d/*"):
            os.truncate(path, 100)
    else:  # its record of what shaped it
        (job_dir / "checkpoints" / str(step) / "meta" / "metadata").write_text("{garbage")


@pytest.mark.parametrize("part", ["data", "meta"])
def test_an_unreadable_newest_checkpoint_falls_back_to_the_one_before(part, slow_data, uninterrupted, tmp_path):
    job_dir = tmp_path / "job"
    run_here("train", job_args(slow_data, job_dir, epochs=3), check=True)
    _damage(job_dir, 3 * STEPS_PER_EPOCH, part)
    result = run_here("train", job_args(slow_data, job_dir), check=True)
    warnings = result.stderr.strip().splitlines()
    assert warnings[0].startswith(
        f"warning: checkpoint step {3 * STEPS_PER_EPOCH} in {job_dir}/checkpoints is unreadable ("
    )
    assert warnings[1:] == [
        f"warning: set aside {job_dir}/checkpoints/{3 * STEPS_PER_EPOCH}.unreadable",
        f"warning: resuming from the newest readable checkpoint, step {2 * STEPS_PER_EPOCH}",
    ]
    assert f"Resuming from epoch 2 (step {2 * STEPS_PER_EPOCH})" in result.stdout
    assert_states_equal(load_final_state(job_dir), uninterrupted)


def test_no_readable_checkpoint_is_a_one_line_error(tiny_pickle, tmp_path):
    args = ["--train-file", str(tiny_pickle), "--job-dir", str(tmp_path), "--batch-size", "32", "--epochs", "1"]
    run_here("train", args, check=True)
    _damage(tmp_path, 4, "meta")
    result = run_here("train", [*args[:-1], "2"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: no readable checkpoint in {tmp_path}/checkpoints (steps [4] are damaged); move it away to start afresh"
    )


def test_an_unwritable_job_dir_is_a_one_line_error(tiny_pickle):
    result = run_here("train", ["--train-file", str(tiny_pickle), "--job-dir", "/proc/nope"])
    assert result.returncode == 2
    # The job dir is made before any data is read: where it cannot be, the job stops there.
    assert result.stderr.strip() == "error: --job-dir /proc/nope: cannot create it: No such file or directory"
