"""Trials as processes: each trial a real `python -m mnist_jax.train`, P at once, as Vertex AI runs them.

A trial process gets its parameters as `--name=value` flags, its own job dir
and the variables Vertex sets (`Driver.trial_args`); its whole output goes
to its `train.log`. The driver reads each epoch's tuning metric from the
trial's cloudml-hypertune file, reports it, and stops a trial the study's rule
stops with SIGTERM, so it checkpoints. Trials die with the driver
(PDEATHSIG), so no orphan trains beside a resumed trial; they do not
preallocate GPU memory, as several may share a GPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import optuna

from mnist_jax.common.errors import ConfigError
from mnist_jax.common.preemption import EXIT_STATUS as PREEMPTED_STATUS
from mnist_jax.common.preemption import INTERRUPTED_STATUS, Preempted, PreemptionGuard
from mnist_jax.common.status import Status
from mnist_jax.study.driver import Driver
from mnist_jax.training import config as flags

POLL_S = 0.1  # how often the driver looks at its trial processes
PR_SET_PDEATHSIG = 1


def read_metric(path: str, tag: str) -> dict[int, float]:
    """{epoch: value} a trial reported for `tag` in its hypertune metric file (torn lines skipped:
    cloudml-hypertune rewrites the file in place)."""
    try:
        text = Path(path).read_text()
    except OSError:
        return {}
    measurements = {}
    for line in text.splitlines():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            entry = json.loads(line)
            measurements[int(entry["global_step"])] = float(entry[tag])
    return measurements


def _die_with_parent() -> None:
    """In a trial process: SIGKILL when the driver dies, so no orphan trains beside a resumed trial."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))


@dataclasses.dataclass
class TrialProcess:
    trial: optuna.Trial
    process: subprocess.Popen
    log: IO[bytes]
    log_path: str
    metric_file: str
    epochs: int
    seen: set[int] = dataclasses.field(default_factory=set)
    stop_requested: bool = False


def start_process(driver: Driver, trial: optuna.Trial) -> TrialProcess:
    argv, env = driver.trial_args(trial)
    os.makedirs(driver.dirs.local_dir(trial.number), exist_ok=True)
    log_path = driver.dirs.log_path(trial.number)
    log_file = open(log_path, "ab")  # a resumed trial's log continues its first one
    try:  # the epoch that ends the trial: a stop is never asked there
        epochs = flags.parse_args(argv, {**os.environ, **env}).epochs
    except ConfigError:  # the trial itself will say what is wrong, and fail
        epochs = driver.base.epochs
    process = subprocess.Popen(
        [sys.executable, "-m", "mnist_jax.train", *argv],
        # Trials sharing a GPU must not each take most of its memory.
        env={**os.environ, **env, "XLA_PYTHON_CLIENT_PREALLOCATE": "false", "PYTHONUNBUFFERED": "1"},
        stdout=log_file,
        stderr=subprocess.STDOUT,
        preexec_fn=_die_with_parent,  # the driver runs no threads of its own, and imports no JAX in this mode
    )
    return TrialProcess(trial, process, log_file, log_path, env["CLOUD_ML_HP_METRIC_FILE"], epochs)


def _collect(driver: Driver, running: TrialProcess) -> None:
    """Reports a trial's new measurements; asks it to stop (SIGTERM: it checkpoints) if the study says so."""
    measured = read_metric(running.metric_file, driver.spec.metric)
    for epoch, value in sorted((e, v) for e, v in measured.items() if e not in running.seen):
        running.seen.add(epoch)
        (stop,) = driver.report_now([(running.trial, epoch, value, epoch >= running.epochs)])
        if stop and not running.stop_requested:
            running.stop_requested = True
            running.process.send_signal(signal.SIGTERM)
    driver.store.beat()  # a trial may go long between epochs


def _last_error(log_path: str) -> str:
    """The trial's own one-line error, else the last line of its log."""
    lines = [line.strip() for line in Path(log_path).read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["no output"])[-1]


def _end_process(driver: Driver, running: TrialProcess, preempted: bool) -> None:
    _collect(driver, running)
    running.log.close()
    driver.dirs.keep_log(running.trial.number)
    code = running.process.returncode
    terminated = code in (PREEMPTED_STATUS, INTERRUPTED_STATUS, -signal.SIGTERM, -signal.SIGINT)
    if code == 0:
        driver.tell(running.trial, Status.SUCCEEDED)
    elif terminated and running.stop_requested:
        driver.tell(running.trial, Status.STOPPED)
    elif terminated and preempted:
        driver.release(running.trial)
    else:
        driver.tell(running.trial, Status.FAILED, f"{_last_error(running.log_path)} (exit {code})")


def run_processes(driver: Driver, parallel: int) -> None:
    """Runs trials as trainer processes, `parallel` at once, until no slot is left; Preempted on SIGTERM
    once every trial in hand has saved and been handed back."""
    running: dict[int, TrialProcess] = {}
    with PreemptionGuard() as preemption:
        forwarded = False
        while True:
            while len(running) < parallel and not preemption.requested:
                trial = driver.pop()
                if trial is None:
                    break
                running[trial.number] = start_process(driver, trial)
            if not running:
                break
            if preemption.requested and not forwarded:
                for each in running.values():
                    each.process.send_signal(signal.SIGTERM)
                forwarded = True
            time.sleep(POLL_S)
            for number, each in list(running.items()):
                _collect(driver, each)
                if each.process.poll() is not None:
                    del running[number]
                    _end_process(driver, each, preemption.requested)
        if preemption.requested:
            raise Preempted(
                "every running trial saved its checkpoint; rerun the same command to continue", preemption.signum
            )
