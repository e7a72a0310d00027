"""One worker's trials: take slots and draw their parameters, decide stops from one snapshot, write reports,
tell results, and keep `study.json` current. Trials run as processes (`processes`) or in lanes (`lanes`);
both drive this."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import optuna
from optuna.trial import TrialState

from mnist_jax.common import storage
from mnist_jax.common.log import logger
from mnist_jax.common.status import Status
from mnist_jax.study import population, record, search
from mnist_jax.study.heartbeat import BEATS_PER_STALE
from mnist_jax.study.rdb import open_trial, redact, trial_id
from mnist_jax.study.store import StudyStore
from mnist_jax.training import config as flags

SUMMARY_S = 5.0  # study.json is rewritten at most this often while trials end (and always at the end)


class Writes(NamedTuple):
    """What an epoch's decisions leave to write: measurements, pruner attributes, console lines."""

    values: list[tuple[int, int, float]]
    attrs: list[tuple[int, str, Any]]
    lines: list[str]


class TrialDirs:
    """Where a study's trials write: each its own job dir `<job-dir>/trial-<id>`, and its local files (tuning
    metric, `train.log`) there too, or in a scratch directory while a gs:// job dir holds the rest."""

    def __init__(self, job_dir: str) -> None:
        self.job_dir = job_dir
        self.scratch = None if storage.is_local(job_dir) else tempfile.mkdtemp(prefix="mnist-jax-tune-")

    def job_dir_of(self, number: int) -> str:
        return storage.join(self.job_dir, f"trial-{number + 1}")

    def local_dir(self, number: int) -> str:
        return self.job_dir_of(number) if self.scratch is None else os.path.join(self.scratch, f"trial-{number + 1}")

    def log_path(self, number: int) -> str:
        """A trial's console output, whole: its process's stdout and stderr, or its lane's lines."""
        return os.path.join(self.local_dir(number), "train.log")

    def keep_log(self, number: int) -> None:
        """With a gs:// job dir, copies the trial's log beside its outputs."""
        if self.scratch is not None:
            log_uri = storage.join(self.job_dir_of(number), "train.log")
            storage.write_bytes_atomic(log_uri, Path(self.log_path(number)).read_bytes())

    def remove_scratch(self) -> None:
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)


class Driver:
    """One worker's trials: takes slots, decides stops from one snapshot, writes reports, tells results."""

    def __init__(self, store: StudyStore, base: flags.Config, extra: Sequence[str]) -> None:
        self.store, self.spec, self.rule = store, store.spec, store.rule
        self.base, self.extra = base, list(extra)
        self.dirs = TrialDirs(base.job_dir)
        self.running: dict[int, optuna.Trial] = {}
        self.params: dict[int, dict[str, Any]] = {}  # trial number -> the parameters drawn for it
        self.started, self.epochs_trained = time.monotonic(), 0
        self.summarised = 0.0  # when study.json was last written

    # --- slots ---------------------------------------------------------------------

    def pop(self) -> optuna.Trial | None:
        """Takes the next trial slot and draws its parameters, or None when none is left."""
        taken = self.store.take()
        if taken is None:
            return None
        number, slot, resumed = taken
        trial = open_trial(self.store.study, slot)
        params = {p.name: search.suggest(trial, p) for p in self.spec.parameters}
        # In one transaction: what study.json reads, and for the dashboard, each parameter under its own
        # name (a reverse-log one is drawn mirrored) and the trial's id as study.json and the job dirs number it.
        shown = {"params": params, "job_dir": self.dirs.job_dir_of(number), "trial": number + 1, **params}
        self.store.report([], [], [(slot, key, value) for key, value in shown.items()])
        self.params[number] = params
        self.running[number] = trial
        logger.info(f"trial {number + 1}: {'resuming' if resumed else 'starting'} {params}")
        return trial

    def release(self, trial: optuna.Trial) -> None:
        """Gives an interrupted trial back to the study: the next worker resumes it from its checkpoint."""
        self.store.release(trial_id(trial))
        self.running.pop(trial.number, None)

    def release_all(self) -> None:
        for trial in list(self.running.values()):
            self.release(trial)

    def await_work(self) -> bool:
        """When no slot is free but other workers hold trials: waits until one ends (False: nothing is left)
        or its worker is gone (True: take it over)."""
        while True:
            self.store.snapshot()
            if any(t.state == TrialState.WAITING for t in self.store.trials):
                return self.store.failures() < self.spec.max_failed_trials
            if not self.store.others_running():
                return False
            if self.store.take_over():
                return True
            self.store.beat()
            time.sleep(min(self.store.stale_after_s / BEATS_PER_STALE, 5.0))

    def trial_args(self, trial: optuna.Trial) -> tuple[list[str], dict[str, str]]:
        """A trial's trainer flags and variables, as Vertex gives them to a trial's container."""
        params = self.params[trial.number]
        argv = [
            *self.extra,
            "--job-dir",
            self.dirs.job_dir_of(trial.number),
            *(f"--{name}={flags.flag_text(value)}" for name, value in params.items()),
        ]
        env = {
            "CLOUD_ML_TRIAL_ID": str(trial.number + 1),
            "CLOUD_ML_HP_METRIC_FILE": os.path.join(self.dirs.local_dir(trial.number), "hypertune.metrics"),
        }
        return argv, env

    # --- epochs: decide now, write later ---------------------------------------------

    def decide(self, measured: Sequence[tuple[optuna.Trial, int, float, bool]]) -> tuple[list[bool], Writes]:
        """Records (trial, epoch, value, final) measurements in the worker's view and decides, from one
        snapshot, which trials stop; returns the decisions and what is left to write (`write`)."""
        if self.rule != "none":
            self.store.snapshot()
        view = self.store.view()
        stops, writes = [], Writes([], [], [])
        for trial, epoch, value, final in measured:
            slot = trial_id(trial)
            if self.store.record(slot, epoch, value):
                writes.values.append((slot, epoch, value))
                self.epochs_trained += 1
            stop = not final and self.rule != "none" and self.store.should_stop(view, slot)
            if final or stop:  # the next decisions compare with it as the storage soon will
                self.store.end(slot, TrialState.COMPLETE if final else TrialState.PRUNED)
            stops.append(stop)
            line = f"trial {trial.number + 1} epoch {epoch}: {self.spec.metric}={value:.4f}"
            writes.lines.append(line + (" (stopping)" if stop else ""))
        writes.attrs.extend(view.writes)
        return stops, writes

    def write(self, writes: Writes) -> None:
        """Stores an epoch's decisions in one transaction, then shows them."""
        self.store.report(writes.values, writes.attrs)
        for line in writes.lines:
            logger.info(line)

    def report_now(self, measured: Sequence[tuple[optuna.Trial, int, float, bool]]) -> list[bool]:
        stops, writes = self.decide(measured)
        self.write(writes)
        return stops

    def tell(self, trial: optuna.Trial, status: Status, error: str | None = None) -> None:
        """Closes a trial as SUCCEEDED, STOPPED or FAILED; study.json follows, at most every SUMMARY_S."""
        values = [v for _, v in sorted(self.store.measurements(trial_id(trial)).items())]
        value = record.measure(self.spec, values) if values else None
        if status == Status.SUCCEEDED and value is None:
            status, error = Status.FAILED, f"trial reported no '{self.spec.metric}' metric"
        state = {Status.SUCCEEDED: TrialState.COMPLETE, Status.STOPPED: TrialState.PRUNED}.get(status, TrialState.FAIL)
        if state == TrialState.FAIL:
            trial.set_user_attr("error", error or "failed")
        self.store.study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
        self.store.end(trial_id(trial), state)
        self.running.pop(trial.number, None)
        shown = f" {self.spec.metric}={value:.4f}" if value is not None else ""
        logger.info(f"trial {trial.number + 1}: {status}{shown}" + (f": {error}" if error else ""))
        if time.monotonic() - self.summarised >= SUMMARY_S or not self.running:
            summary = self.summary()
            logger.info(record.progress_line(summary, self.eta_s(summary)))
            self.write_summary(summary)

    # --- the study's record ----------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """study.json's content, from one read of the storage (every worker's trials)."""
        header = {
            "name": self.store.name,
            "storage": redact(self.store.storage_url),
            "algorithm": self.spec.algorithm,
            "search": population.describe(self.spec, self.store.population),
            "early_stopping": self.rule,
            "stopping_rule": search.describe_stopping(self.rule),
            "seed": self.store.seed,
        }
        return record.summary(self.spec, self.store.study.get_trials(deepcopy=False), header)

    def write_summary(self, summary: dict[str, Any]) -> None:
        text = json.dumps(summary, indent=2) + "\n"
        storage.write_bytes_atomic(storage.join(self.dirs.job_dir, "study.json"), text.encode())
        self.summarised = time.monotonic()

    def eta_s(self, summary: dict[str, Any]) -> float | None:
        """Seconds left at this worker's pace: the epochs not yet trained, at its seconds per trial-epoch."""
        if not self.epochs_trained:
            return None
        pace = (time.monotonic() - self.started) / self.epochs_trained
        return record.epochs_left(summary, self.base.epochs) * pace
