"""Hyperparameter tuning on this machine, the way Vertex AI runs a study.

    python -m mnist_jax.tune convert CONFIG
    python -m mnist_jax.tune run --config CONFIG --job-dir DIR [--storage URL] [--study-name NAME] \\
        [--max-trials N] [--parallel-trials P] [--vectorize K] [--seed S] [-- trainer flags]

`convert` prints the Vertex AI form of a legacy study config. `run` runs a
study: Optuna searches (`search.py`: Bayesian by default, random or grid, with
median stopping when the study asks), and trials train either as real
`python -m mnist_jax.train` processes, P at once, each given its parameters as
`--name=value` flags and its own job dir `DIR/trial-<id>`, or, with
`--vectorize K`, in K lanes of one training program (`loop.py`) that refill
as trials end. Each trial writes what it would write alone.

The study lives in Optuna storage, by default `DIR/study.db` (SQLite);
`--storage URL` names any Optuna RDB URL, so a PostgreSQL or MySQL server
lets several machines share one study. When it is created, the study gets
exactly maxTrials trial slots (a grid study, its combinations), and workers
take slots atomically, so a study never runs more than maxTrials trials and
no slot twice. Rerunning the same command resumes: finished trials are kept,
interrupted ones (whose worker is gone: its process on this host, or its
heartbeat for STALE_AFTER_S elsewhere) resume from their checkpoints.
`DIR/study.json` is rewritten atomically after every trial and `study.png`
at the end.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import datetime
import io
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import optuna
import yaml
from optuna.trial import TrialState

from mnist_jax import config as flags
from mnist_jax import log, search, storage
from mnist_jax.errors import ConfigError, MnistJaxError, report
from mnist_jax.log import logger
from mnist_jax.preemption import EXIT_STATUS as PREEMPTED_STATUS
from mnist_jax.preemption import Preempted, PreemptionGuard
from mnist_jax.study import Study, load_study, to_vertex

# A trial whose worker on another host has not been heard from for this long is taken over.
STALE_AFTER_S = 600
BEAT_S = 30  # how often a running trial's heartbeat is written
POLL_S = 0.1  # how often the driver looks at its trial processes
OWNER, HEARTBEAT = "mnist_jax:owner", "mnist_jax:heartbeat"
SPEC, READY = "mnist_jax:spec", "mnist_jax:ready"
STATUS = {
    TrialState.COMPLETE: "SUCCEEDED",
    TrialState.PRUNED: "STOPPED",
    TrialState.FAIL: "FAILED",
    TrialState.RUNNING: "ACTIVE",
    TrialState.WAITING: "REQUESTED",
}
PR_SET_PDEATHSIG = 1


def _process_start(pid: int) -> str | None:
    """When process `pid` started, in clock ticks since boot (tells a reused pid apart); None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


@dataclasses.dataclass(frozen=True)
class Worker:
    """A `tune run` process, as recorded on the trials it runs."""

    host: str
    pid: int
    started: str | None

    @classmethod
    def me(cls) -> Worker:
        return cls(socket.gethostname(), os.getpid(), _process_start(os.getpid()))

    def gone(self, heartbeat: float) -> bool:
        if self.host == socket.gethostname():
            return _process_start(self.pid) != self.started
        return time.time() - heartbeat > STALE_AFTER_S


def _write_ahead(store: optuna.storages.RDBStorage) -> None:
    """SQLite in write-ahead mode, syncing at checkpoints rather than at every commit: a report per
    trial-epoch then costs no fsync, and a crash still leaves the database consistent."""
    import sqlalchemy

    engine = store.engine

    def pragmas(connection: Any, record: Any) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    sqlalchemy.event.listen(engine, "connect", pragmas)
    engine.dispose()  # connections opened before the listener get replaced


def _redact(url: str) -> str:
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def _flag_value(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


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


class Driver:
    """One worker's view of a study: takes trial slots, reports, stops, tells, summarises."""

    def __init__(self, spec: Study, job_dir: str, storage_url: str, name: str, seed: int, extra: Sequence[str]) -> None:
        self.spec, self.job_dir, self.extra, self.seed = spec, job_dir.rstrip("/"), list(extra), seed
        self.storage_url, self.name = storage_url, name
        self.base = flags.parse_args([*self.extra, "--job-dir", self.job_dir])  # bad trainer flags fail here
        self.me = Worker.me()
        self.scratch = None if storage.is_local(job_dir) else tempfile.mkdtemp(prefix="mnist-jax-tune-")
        self.study, self.storage = self._open()
        self.study_id = self.storage.get_study_id_from_name(name)
        self.running: dict[int, optuna.Trial] = {}
        self.ids: dict[int, int] = {}  # trial number -> the storage's trial id
        self.beats: dict[int, float] = {}  # trial number -> when its heartbeat was last written
        self.started, self.epochs_trained = time.monotonic(), 0

    # --- the study in its storage ------------------------------------------------

    def _open(self) -> tuple[optuna.Study, optuna.storages.BaseStorage]:
        for attempt in range(3):
            try:
                store = optuna.storages.RDBStorage(self.storage_url)
                if self.storage_url.startswith("sqlite:"):
                    _write_ahead(store)
                break
            except Exception as e:  # a bad URL, a missing driver, a server that does not answer
                # Workers that start together race to create the storage's tables: the loser retries.
                if attempt == 2:
                    raise ConfigError(f"cannot open study storage {_redact(self.storage_url)}: {e}") from None
                time.sleep(1)
        spec = json.dumps(to_vertex(self.spec)["studySpec"] | {"maxTrialCount": self.spec.max_trials}, sort_keys=True)
        direction = self.spec.goal.lower()
        try:
            study = optuna.create_study(
                storage=store,
                study_name=self.name,
                direction=direction,
                sampler=search.sampler(self.spec, self.seed),
                pruner=search.pruner(self.spec),
            )
        except optuna.exceptions.DuplicatedStudyError:
            # Another worker's study: draw from another random stream, so no draw repeats one of its own.
            seed = int.from_bytes(os.urandom(4), "little")
            study = optuna.load_study(
                storage=store,
                study_name=self.name,
                sampler=search.sampler(self.spec, seed),
                pruner=search.pruner(self.spec),
            )
            self._await_ready(store, spec)
            return study, store
        study.set_user_attr("algorithm", self.spec.algorithm)
        study.set_user_attr("search", search.describe(self.spec))
        study_id = store.get_study_id_from_name(self.name)
        store.set_study_system_attr(study_id, SPEC, spec)
        slots = search.grid(self.spec)[: self.spec.max_trials] if self.spec.algorithm == "GRID_SEARCH" else None
        for params in slots or [{}] * self.spec.max_trials:
            study.enqueue_trial(params)
        store.set_study_system_attr(study_id, READY, True)
        return study, store

    def _await_ready(self, store: optuna.storages.BaseStorage, spec: str) -> None:
        study_id = store.get_study_id_from_name(self.name)
        deadline = time.monotonic() + 60
        while not store.get_study_system_attrs(study_id).get(READY):
            if time.monotonic() > deadline:
                raise ConfigError(f"study {self.name} in {_redact(self.storage_url)} was never set up")
            time.sleep(0.2)
        if store.get_study_system_attrs(study_id).get(SPEC) != spec:
            raise ConfigError(
                f"study {self.name} in {_redact(self.storage_url)} was created from another study config or "
                "--max-trials; use the same ones, or a new --job-dir or --study-name"
            )

    def _trial_id(self, number: int) -> int:
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)

    def _reclaim(self) -> None:
        """Hands back the running trials whose worker is gone, so they resume from their checkpoints."""
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            owner = t.system_attrs.get(OWNER)
            started = t.datetime_start.timestamp() if t.datetime_start else 0.0
            if owner is None or Worker(**owner).gone(t.system_attrs.get(HEARTBEAT, started)):
                self.storage.set_trial_state_values(self._trial_id(t.number), TrialState.WAITING)

    def failures(self) -> int:
        return len(self.study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))

    def pop(self) -> optuna.Trial | None:
        """Takes the next trial slot (an interrupted trial first), or None when none is left."""
        if self.failures() >= self.spec.max_failed_trials:
            return None
        self._reclaim()
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            trial_id = self._trial_id(t.number)
            try:
                if not self.storage.set_trial_state_values(trial_id, TrialState.RUNNING):
                    continue  # another worker took it first
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
            self.storage.set_trial_system_attr(trial_id, OWNER, dataclasses.asdict(self.me))
            trial = optuna.Trial(self.study, trial_id)
            self.ids[trial.number] = trial_id
            self.beat(trial)
            params = {p.name: search.suggest(trial, p) for p in self.spec.parameters}
            trial.set_user_attr("params", params)
            trial.set_user_attr("job_dir", self.trial_dir(trial.number))
            self.running[trial.number] = trial
            again = OWNER in t.system_attrs
            logger.info(f"trial {trial.number + 1}: {'resuming' if again else 'starting'} {params}")
            return trial
        return None

    # --- one trial ---------------------------------------------------------------

    def trial_dir(self, number: int) -> str:
        return storage.join(self.job_dir, f"trial-{number + 1}")

    def local_dir(self, number: int) -> str:
        """Where a trial's local files (tuning metric, process log) go: its job dir, or scratch for gs://."""
        return self.trial_dir(number) if self.scratch is None else os.path.join(self.scratch, f"trial-{number + 1}")

    def log_path(self, number: int) -> str:
        """A trial's console output, whole: its process's stdout and stderr, or its lane's lines."""
        return os.path.join(self.local_dir(number), "train.log")

    def keep_log(self, number: int) -> None:
        """With a gs:// job dir, copies the trial's log beside its outputs."""
        if self.scratch is not None:
            log_uri = storage.join(self.trial_dir(number), "train.log")
            storage.write_bytes_atomic(log_uri, Path(self.log_path(number)).read_bytes())

    def trial_args(self, trial: optuna.Trial) -> tuple[list[str], dict[str, str]]:
        """A trial's trainer flags and variables, as Vertex gives them to a trial's container."""
        params = trial.user_attrs["params"]
        argv = [
            *self.extra,
            "--job-dir",
            self.trial_dir(trial.number),
            *(f"--{name}={_flag_value(value)}" for name, value in params.items()),
        ]
        env = {
            "CLOUD_ML_TRIAL_ID": str(trial.number + 1),
            "CLOUD_ML_HP_METRIC_FILE": os.path.join(self.local_dir(trial.number), "hypertune.metrics"),
        }
        return argv, env

    def report(self, trial: optuna.Trial, epoch: int, value: float, final: bool) -> bool:
        """Records a trial's epoch; True if the study's stopping rule stops it here."""
        trial.report(value, epoch)  # a resumed trial repeats its last epochs: Optuna keeps the first report
        self.beat(trial)
        self.epochs_trained += 1
        stop = not final and self.spec.median_stopping and trial.should_prune()
        logger.info(
            f"trial {trial.number + 1} epoch {epoch}: {self.spec.metric}={value:.4f}" + (" (stopping)" if stop else "")
        )
        return stop

    def beat(self, trial: optuna.Trial) -> None:
        """Tells other workers the trial is alive, at most every BEAT_S."""
        now = time.time()
        if now - self.beats.get(trial.number, 0.0) >= BEAT_S:
            self.storage.set_trial_system_attr(self.ids[trial.number], HEARTBEAT, now)
            self.beats[trial.number] = now

    def tell(self, trial: optuna.Trial, status: str, error: str | None = None) -> None:
        """Closes a trial as SUCCEEDED, STOPPED or FAILED, and rewrites study.json."""
        measurements = self.storage.get_trial(self.ids[trial.number]).intermediate_values
        value = self.measure([v for _, v in sorted(measurements.items())]) if measurements else None
        if status == "SUCCEEDED" and value is None:
            status, error = "FAILED", f"trial reported no '{self.spec.metric}' metric"
        if status == "SUCCEEDED":
            self.study.tell(trial, value)
        elif status == "STOPPED":
            self.study.tell(trial, state=TrialState.PRUNED)
        else:
            trial.set_user_attr("error", error or "failed")
            self.study.tell(trial, state=TrialState.FAIL)
        self.running.pop(trial.number, None)
        shown = f" {self.spec.metric}={value:.4f}" if value is not None else ""
        logger.info(f"trial {trial.number + 1}: {status}{shown}" + (f": {error}" if error else ""))
        summary = self.summary()
        logger.info(progress_line(summary, self))
        self.write_summary(summary)

    def release(self, trial: optuna.Trial) -> None:
        """Gives an interrupted trial back to the study: the next worker resumes it from its checkpoint."""
        self.storage.set_trial_state_values(self.ids[trial.number], TrialState.WAITING)
        self.running.pop(trial.number, None)

    def release_all(self) -> None:
        for trial in list(self.running.values()):
            self.release(trial)

    def measure(self, values: list[float]) -> float:
        """A trial's metric from its measurements, per the study's measurementSelectionType."""
        if self.spec.measurement_selection == "BEST_MEASUREMENT":
            return max(values) if self.spec.goal == "MAXIMIZE" else min(values)
        return values[-1]

    # --- the study's record ----------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """study.json's content, from the storage (every worker's trials)."""
        trials = []
        for t in self.study.get_trials(deepcopy=False):
            if "params" not in t.user_attrs:
                continue  # a slot no worker has taken yet
            measurements = [[step, value] for step, value in sorted(t.intermediate_values.items())]
            status = STATUS[t.state]
            metric = None
            if status in ("SUCCEEDED", "STOPPED") and measurements:
                metric = self.measure([v for _, v in measurements])
            record = {
                "id": t.number + 1,
                "status": status,
                "params": t.user_attrs["params"],
                "metric": metric,
                "measurements": measurements,
                "job_dir": t.user_attrs.get("job_dir"),
                "worker": "{host}:{pid}".format(**t.system_attrs[OWNER]) if OWNER in t.system_attrs else None,
            }
            if "error" in t.user_attrs:
                record["error"] = t.user_attrs["error"]
            trials.append(record)
        scored = [t for t in trials if t["metric"] is not None]
        pick = max if self.spec.goal == "MAXIMIZE" else min
        best = pick(scored, key=lambda t: t["metric"]) if scored else None
        failed = sum(t["status"] == "FAILED" for t in trials)
        unfinished = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
        if failed >= self.spec.max_failed_trials or (not unfinished and not scored):
            status = "FAILED"  # as on Vertex: maxFailedTrials reached, or nothing succeeded
        else:
            status = "ACTIVE" if unfinished else "SUCCEEDED"
        return {
            "name": self.name,
            "storage": _redact(self.storage_url),
            "algorithm": self.spec.algorithm,
            "search": search.describe(self.spec),
            "early_stopping": "median" if self.spec.median_stopping else "none",
            "measurement_selection": self.spec.measurement_selection,
            "goal": self.spec.goal,
            "metric": self.spec.metric,
            "max_trials": self.spec.max_trials,
            "seed": self.seed,
            "status": status,
            "trials": trials,
            "best": best,
        }

    def write_summary(self, summary: dict[str, Any]) -> None:
        text = json.dumps(summary, indent=2) + "\n"
        storage.write_bytes_atomic(storage.join(self.job_dir, "study.json"), text.encode())

    def eta_s(self, summary: dict[str, Any]) -> float | None:
        """Seconds left at this worker's pace: the epochs not yet trained, at its seconds per trial-epoch."""
        if not self.epochs_trained:
            return None
        left = sum(self.base.epochs - len(t["measurements"]) for t in summary["trials"] if t["status"] == "ACTIVE")
        left += (self.spec.max_trials - len(summary["trials"])) * self.base.epochs
        return max(left, 0) * (time.monotonic() - self.started) / self.epochs_trained


def progress_line(summary: dict[str, Any], driver: Driver) -> str:
    """`study: 5/12 done (3 succeeded, 2 stopped, 0 failed), 2 running; best trial 4 accuracy=0.97; ETA 0:00:31`"""
    count = {s: sum(t["status"] == s for t in summary["trials"]) for s in ("SUCCEEDED", "STOPPED", "FAILED", "ACTIVE")}
    done = count["SUCCEEDED"] + count["STOPPED"] + count["FAILED"]
    best = summary["best"]
    eta = driver.eta_s(summary)
    return (
        f"study: {done}/{summary['max_trials']} done ({count['SUCCEEDED']} succeeded, {count['STOPPED']} stopped, "
        f"{count['FAILED']} failed), {count['ACTIVE']} running; "
        + (f"best trial {best['id']} {summary['metric']}={best['metric']:.4f}" if best else "no best yet")
        + (f"; ETA {datetime.timedelta(seconds=round(eta))}" if eta is not None else "")
    )


def study_png(summary: dict[str, Any]) -> bytes:
    """Each trial's metric over epochs (stopped trials dashed) and the best so far, trial by trial."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(figure)
    curves, best = figure.subplots(1, 2)
    for t in summary["trials"]:
        if t["measurements"]:
            epochs, values = zip(*t["measurements"])
            curves.plot(epochs, values, "--" if t["status"] == "STOPPED" else "-", marker=".", alpha=0.7)
    curves.set(xlabel="epoch", ylabel=summary["metric"], title="each trial (dashed: stopped)")
    pick = max if summary["goal"] == "MAXIMIZE" else min
    scored = [t for t in summary["trials"] if t["metric"] is not None]
    running: list[float] = []
    for t in scored:
        running.append(pick(running[-1], t["metric"]) if running else t["metric"])
    best.step([t["id"] for t in scored], running, where="post")
    best.plot([t["id"] for t in scored], [t["metric"] for t in scored], "o", alpha=0.5)
    best.set(xlabel="trial", ylabel=summary["metric"], title="best so far")
    for axes in (curves, best):
        axes.grid(True, alpha=0.3)
        axes.xaxis.get_major_locator().set_params(integer=True)
    figure.subplots_adjust(left=0.08, right=0.98, bottom=0.12, top=0.92, wspace=0.25)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


# --- trials as processes -------------------------------------------------------


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
    os.makedirs(driver.local_dir(trial.number), exist_ok=True)
    log_path = driver.log_path(trial.number)
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
    for epoch, value in sorted(read_metric(running.metric_file, driver.spec.metric).items()):
        if epoch in running.seen:
            continue
        running.seen.add(epoch)
        stop = driver.report(running.trial, epoch, value, final=epoch >= running.epochs)
        if stop and not running.stop_requested:
            running.stop_requested = True
            running.process.send_signal(signal.SIGTERM)
    driver.beat(running.trial)  # a trial may go long between epochs


def _last_error(log_path: str) -> str:
    """The trial's own one-line error, else the last line of its log."""
    lines = [line.strip() for line in Path(log_path).read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["no output"])[-1]


def _end_process(driver: Driver, running: TrialProcess, preempted: bool) -> None:
    _collect(driver, running)
    running.log.close()
    driver.keep_log(running.trial.number)
    code = running.process.returncode
    terminated = code in (PREEMPTED_STATUS, -signal.SIGTERM)
    if code == 0:
        driver.tell(running.trial, "SUCCEEDED")
    elif terminated and running.stop_requested:
        driver.tell(running.trial, "STOPPED")
    elif terminated and preempted:
        driver.release(running.trial)
    else:
        driver.tell(running.trial, "FAILED", f"{_last_error(running.log_path)} (exit {code})")


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
            raise Preempted("SIGTERM: every running trial saved its checkpoint; rerun the same command to continue")


# --- trials in lanes -------------------------------------------------------------


class LaneSource:
    """The study as a training loop's trial source: slots become lanes' trials, epochs become reports."""

    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        self.trials: dict[str, optuna.Trial] = {}

    def next_trial(self) -> flags.Config | None:
        while (trial := self.driver.pop()) is not None:
            argv, env = self.driver.trial_args(trial)
            try:
                config = flags.parse_args(argv, {**os.environ, **env})
            except ConfigError as e:
                self.driver.tell(trial, "FAILED", str(e))
                continue
            if config.hpt_metric_tag != self.driver.spec.metric:
                self.driver.tell(
                    trial, "FAILED", f"trial reports '{config.hpt_metric_tag}', not '{self.driver.spec.metric}'"
                )
                continue
            self.trials[config.trial_id] = trial  # type: ignore[index]
            os.makedirs(self.driver.local_dir(trial.number), exist_ok=True)
            return config
        return None

    def epoch_done(self, config: flags.Config, record: dict[str, Any]) -> bool:
        trial = self.trials[config.trial_id]  # type: ignore[index]
        return self.driver.report(
            trial, record["epoch"], record["val_accuracy"], final=record["epoch"] >= config.epochs
        )

    def say(self, config: flags.Config, message: str) -> None:
        """A lane's console lines go to its trial's train.log, as a trial process's would."""
        with open(self.driver.log_path(self.trials[config.trial_id].number), "a") as f:  # type: ignore[index]
            f.write(message + "\n")

    def trial_done(self, config: flags.Config, outcome: Any) -> None:
        trial = self.trials.pop(config.trial_id)  # type: ignore[arg-type]
        self.driver.keep_log(trial.number)
        self.driver.tell(trial, outcome.status, outcome.error)


def run_lanes(driver: Driver, lanes: int) -> None:
    """Runs the study's trials in `lanes` lanes of one training program (imports JAX)."""
    from mnist_jax import loop, parallel, steps

    shared = sorted({p.name.replace("-", "_") for p in driver.spec.parameters} & set(loop.SHARED))
    if shared:
        raise ConfigError(f"--vectorize: trials trained together must share {', '.join(shared)}; the study tunes it")
    parallel.initialize(driver.base)
    steps.enable_compile_cache()
    loop.train_lanes(driver.base, LaneSource(driver), lanes)


# --- the command line ---------------------------------------------------------------


def leaderboard(summary: dict[str, Any]) -> str:
    """The trials as a table, best first."""
    names = sorted({name for t in summary["trials"] for name in t["params"]})
    sign = -1 if summary["goal"] == "MAXIMIZE" else 1
    ranked = sorted(summary["trials"], key=lambda t: (t["metric"] is None, sign * (t["metric"] or 0)))
    header = f"{'rank':>4}  {'trial':>5}  {'status':<9}  {summary['metric']:>12}  " + "  ".join(
        f"{n:>14}" for n in names
    )
    rows = [header, "-" * len(header)]
    for rank, t in enumerate(ranked, 1):
        metric = f"{t['metric']:.4f}" if t["metric"] is not None else "-"
        values = "  ".join(f"{_short(t['params'].get(n)):>14}" for n in names)
        rows.append(f"{rank:>4}  {t['id']:>5}  {t['status']:<9}  {metric:>12}  {values}")
    return "\n".join(rows)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) and math.isfinite(value) else str(value)


def build_parser() -> flags.Parser:
    parser = flags.Parser(prog="python -m mnist_jax.tune", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="print the Vertex AI form of a legacy study config")
    convert.add_argument("config", help="a legacy (or Vertex) study config, YAML")
    run = commands.add_parser(
        "run", help="run a study on this machine", description="Run a study; trainer flags go after --."
    )
    run.add_argument("--config", required=True, help="legacy or Vertex study config, YAML (default: required)")
    run.add_argument(
        "--job-dir", required=True, help="the trials' job dirs and study.json; local or gs:// (default: required)"
    )
    run.add_argument(
        "--storage",
        default=None,
        metavar="URL",
        help="Optuna storage URL; a PostgreSQL or MySQL URL shares the study between machines "
        "(default: sqlite:///<job-dir>/study.db; required for a gs:// job dir)",
    )
    run.add_argument("--study-name", default=None, help="the study's name in the storage (default: the job dir's name)")
    run.add_argument(
        "--max-trials", type=int, default=None, help="override the study's trial count (default: the config's)"
    )
    run.add_argument(
        "--parallel-trials", type=int, default=None, help="trial processes at once (default: the config's)"
    )
    run.add_argument("--seed", type=int, default=0, help="search seed: the same seed draws the same study")
    run.add_argument(
        "--vectorize",
        type=int,
        default=1,
        metavar="K",
        help="train K trials at once in lanes of one program, refilled as trials end "
        "(trials may differ in anything but the data and shapes); 1: each trial its own process",
    )
    flags.add_flags(run, flags.OUTPUT_FLAGS)
    return parser


def default_storage(job_dir: str) -> str:
    if not storage.is_local(job_dir):
        raise ConfigError(
            f"a {job_dir.split(':', 1)[0]}:// job dir needs --storage (an Optuna RDB URL such as "
            "postgresql://..., or sqlite:///study.db on this machine)"
        )
    os.makedirs(job_dir, exist_ok=True)
    return f"sqlite:///{os.path.abspath(os.path.join(job_dir, 'study.db'))}"


def run(args: Any, extra: Sequence[str]) -> int:
    spec, _ = load_study(args.config)
    overrides = {
        k: v for k, v in (("max_trials", args.max_trials), ("parallel_trials", args.parallel_trials)) if v is not None
    }
    if any(v < 1 for v in (*overrides.values(), args.vectorize)):
        raise ConfigError("--max-trials, --parallel-trials and --vectorize must be >= 1")
    spec = dataclasses.replace(spec, **overrides)
    name = args.study_name or Path(args.job_dir.rstrip("/")).name or "study"
    driver = Driver(spec, args.job_dir, args.storage or default_storage(args.job_dir), name, args.seed, extra)
    logger.info(
        f"study {name}: {spec.max_trials} trials, {search.describe(spec)}"
        + (", median stopping" if spec.median_stopping else "")
        + (f", {args.vectorize} lanes" if args.vectorize > 1 else f", {spec.parallel_trials} at a time")
    )
    try:
        if args.vectorize > 1:
            run_lanes(driver, min(args.vectorize, spec.max_trials))
        else:
            run_processes(driver, spec.parallel_trials)
    except BaseException:
        driver.release_all()  # what this worker held resumes in the next one
        with contextlib.suppress(MnistJaxError):
            driver.write_summary(driver.summary())
        raise
    finally:
        if driver.scratch is not None:
            shutil.rmtree(driver.scratch, ignore_errors=True)
    summary = driver.summary()
    driver.write_summary(summary)
    storage.write_bytes_atomic(storage.join(driver.job_dir, "study.png"), study_png(summary))
    logger.info(leaderboard(summary))
    best = summary["best"]
    logger.info(
        f"best: trial {best['id']} {spec.metric}={best['metric']:.4f} {best['params']}" if best else "best: none"
    )
    return 1 if summary["status"] == "FAILED" else 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    try:
        args = build_parser().parse_args(own)
        if args.command == "convert":
            study, _ = load_study(args.config)
            print(yaml.safe_dump(to_vertex(study), sort_keys=False), end="")
            return 0
        log.configure(args.log_format, verbose=args.verbose)
        if not args.verbose:
            optuna.logging.disable_default_handler()
        return run(args, extra)
    except Preempted as e:
        logger.warning(f"preempted: {e}")
        return PREEMPTED_STATUS
    except MnistJaxError as e:
        return report(e)


if __name__ == "__main__":
    sys.exit(main())
