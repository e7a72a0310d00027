"""Hyperparameter tuning on this machine, the way Vertex AI runs a study.

    python -m mnist_jax.tune convert CONFIG
    python -m mnist_jax.tune run --config CONFIG --job-dir DIR [--storage URL] [--study-name NAME] \\
        [--max-trials N] [--parallel-trials P] [--vectorize K] [--stopping RULE] [--seed S] [-- trainer flags]

`convert` prints the Vertex AI form of a legacy study config. `run` runs a
study: Optuna searches (`search.py`: Bayesian by default, random or grid, with
median stopping when the study asks, or successive halving with `--stopping halving`), and trials train either as real
`python -m mnist_jax.train` processes, P at once, each given its parameters as
`--name=value` flags and its own job dir `DIR/trial-<id>`, or, with
`--vectorize K`, in K lanes of one training program (`loop.py`) that refill
as trials end. Each trial writes what it would write alone.

The study lives in Optuna storage (`study_storage.py`), by default
`DIR/study.db` (SQLite); `--storage URL` names any Optuna RDB URL, so a
PostgreSQL or MySQL server lets several machines share one study. Rerunning
the same command resumes: finished trials are kept, interrupted ones resume
from their checkpoints. `DIR/study.json` (`study_record.py`) is rewritten
atomically at most every SUMMARY_S while trials end, and at the end with
`study.png`.

Modules: this one is the command line and `Driver`, one worker's trials (their
dirs, flags, reports, stops and results); `study_storage.py` the study in its
storage; `study_record.py` the record; `tune_processes.py` trials as
processes; `tune_lanes.py` trials in lanes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import optuna
import yaml
from optuna.trial import TrialState

from mnist_jax import cli, log, search, storage, study_record, tune_lanes, tune_processes
from mnist_jax import config as flags
from mnist_jax.errors import ConfigError, MnistJaxError
from mnist_jax.log import logger
from mnist_jax.study import Status, load_study, to_vertex
from mnist_jax.study_storage import BEATS_PER_STALE, PATIENCE_S, STALE_AFTER_S, StorageDown, StudyStore, View, redact

SUMMARY_S = 5.0  # study.json is rewritten at most this often while trials end (and always at the end)


class Writes(NamedTuple):
    """What an epoch's decisions leave to write: measurements, pruner attributes, console lines."""

    values: list[tuple[int, int, float]]
    attrs: list[tuple[int, str, Any]]
    lines: list[str]


class Driver:
    """One worker's trials: takes slots, decides stops from one snapshot, writes reports, tells results."""

    def __init__(self, store: StudyStore, base: flags.Config, extra: Sequence[str]) -> None:
        self.store, self.spec, self.rule = store, store.spec, store.rule
        self.base, self.job_dir, self.extra = base, base.job_dir, list(extra)
        self.scratch = None if storage.is_local(self.job_dir) else tempfile.mkdtemp(prefix="mnist-jax-tune-")
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
        number, trial_id, resumed = taken
        trial = optuna.Trial(self.store.study, trial_id)
        params = {p.name: search.suggest(trial, p) for p in self.spec.parameters}
        # In one transaction: what study.json reads, and for the dashboard, each parameter under its own
        # name (a reverse-log one is drawn mirrored) and the trial's id as study.json and the job dirs number it.
        shown = {"params": params, "job_dir": self.trial_dir(number), "trial": number + 1, **params}
        self.store.report([], user_attrs=[(trial_id, key, value) for key, value in shown.items()])
        self.params[number] = params
        self.running[number] = trial
        logger.info(f"trial {number + 1}: {'resuming' if resumed else 'starting'} {params}")
        return trial

    def release(self, trial: optuna.Trial) -> None:
        """Gives an interrupted trial back to the study: the next worker resumes it from its checkpoint."""
        self.store.release(trial._trial_id)
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
        params = self.params[trial.number]
        argv = [
            *self.extra,
            "--job-dir",
            self.trial_dir(trial.number),
            *(f"--{name}={flags.flag_text(value)}" for name, value in params.items()),
        ]
        env = {
            "CLOUD_ML_TRIAL_ID": str(trial.number + 1),
            "CLOUD_ML_HP_METRIC_FILE": os.path.join(self.local_dir(trial.number), "hypertune.metrics"),
        }
        return argv, env

    # --- epochs: decide now, write later ---------------------------------------------

    def decide(self, measured: Sequence[tuple[optuna.Trial, int, float, bool]]) -> tuple[list[bool], Writes]:
        """Records (trial, epoch, value, final) measurements in the worker's view and decides, from one
        snapshot, which trials stop; returns the decisions and what is left to write (`write`)."""
        if self.rule != "none":
            self.store.snapshot()
        view = View(self.store.trials, self.store.study.direction)
        stops, writes = [], Writes([], [], [])
        for trial, epoch, value, final in measured:
            if self.store.record(trial._trial_id, epoch, value):
                writes.values.append((trial._trial_id, epoch, value))
                self.epochs_trained += 1
            stop = not final and self.rule != "none" and self.store.should_stop(view, trial._trial_id)
            if final or stop:  # the next decisions compare with it as the storage soon will
                self.store.end(trial._trial_id, TrialState.COMPLETE if final else TrialState.PRUNED)
            stops.append(stop)
            line = f"trial {trial.number + 1} epoch {epoch}: {self.spec.metric}={value:.4f}"
            writes.lines.append(line + (" (stopping)" if stop else ""))
        writes.attrs.extend(view.writes)
        return stops, writes

    def write(self, writes: Writes) -> None:
        """Stores an epoch's decisions in one transaction, then shows them."""
        self.store.report(writes.values, system_attrs=writes.attrs)
        for line in writes.lines:
            logger.info(line)

    def report_now(self, measured: Sequence[tuple[optuna.Trial, int, float, bool]]) -> list[bool]:
        stops, writes = self.decide(measured)
        self.write(writes)
        return stops

    def tell(self, trial: optuna.Trial, status: Status, error: str | None = None) -> None:
        """Closes a trial as SUCCEEDED, STOPPED or FAILED; study.json follows, at most every SUMMARY_S."""
        values = [v for _, v in sorted(self.store.measurements(trial._trial_id).items())]
        value = study_record.measure(self.spec, values) if values else None
        if status == Status.SUCCEEDED and value is None:
            status, error = Status.FAILED, f"trial reported no '{self.spec.metric}' metric"
        state = {Status.SUCCEEDED: TrialState.COMPLETE, Status.STOPPED: TrialState.PRUNED}.get(status, TrialState.FAIL)
        if state == TrialState.FAIL:
            trial.set_user_attr("error", error or "failed")
        self.store.study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
        self.store.end(trial._trial_id, state)
        self.running.pop(trial.number, None)
        shown = f" {self.spec.metric}={value:.4f}" if value is not None else ""
        logger.info(f"trial {trial.number + 1}: {status}{shown}" + (f": {error}" if error else ""))
        if time.monotonic() - self.summarised >= SUMMARY_S or not self.running:
            summary = self.summary()
            logger.info(study_record.progress_line(summary, self.eta_s(summary)))
            self.write_summary(summary)

    # --- the study's record ----------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """study.json's content, from one read of the storage (every worker's trials)."""
        header = {
            "name": self.store.name,
            "storage": redact(self.store.storage_url),
            "algorithm": self.spec.algorithm,
            "search": search.describe(self.spec),
            "early_stopping": self.rule,
            "stopping_rule": search.describe_stopping(self.rule),
            "seed": self.store.seed,
        }
        return study_record.summary(self.spec, self.store.study.get_trials(deepcopy=False), header)

    def write_summary(self, summary: dict[str, Any]) -> None:
        text = json.dumps(summary, indent=2) + "\n"
        storage.write_bytes_atomic(storage.join(self.job_dir, "study.json"), text.encode())
        self.summarised = time.monotonic()

    def eta_s(self, summary: dict[str, Any]) -> float | None:
        """Seconds left at this worker's pace: the epochs not yet trained, at its seconds per trial-epoch."""
        if not self.epochs_trained:
            return None
        pace = (time.monotonic() - self.started) / self.epochs_trained
        return study_record.epochs_left(summary, self.base.epochs) * pace


# --- the command line ---------------------------------------------------------------


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
    run.add_argument(
        "--stopping",
        choices=search.STOPPING,
        default="config",
        help="the early-stopping rule: the study config's (median when it asks, else none), median, "
        "halving (successive halving against every trial at the same epoch, running ones included: "
        "an extension Vertex does not have), or none",
    )
    run.add_argument(
        "--stale-after",
        type=float,
        default=STALE_AFTER_S,
        metavar="SECONDS",
        help="take over another host's trial once its worker has been silent this long (a preempted VM's "
        "worker is gone for good); each worker's heartbeat is written four times in that span",
    )
    run.add_argument(
        "--storage-patience",
        type=float,
        default=PATIENCE_S,
        metavar="SECONDS",
        help="how long to wait for a storage server that stopped answering (a restart, a failover) before "
        "stopping with one line",
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


def open_driver(args: Any, extra: Sequence[str]) -> Driver:
    """The study the flags name, opened (or joined) in its storage, and this worker's driver for it."""
    spec, _ = load_study(args.config)
    overrides = {
        k: v for k, v in (("max_trials", args.max_trials), ("parallel_trials", args.parallel_trials)) if v is not None
    }
    if any(v < 1 for v in (*overrides.values(), args.vectorize)):
        raise ConfigError("--max-trials, --parallel-trials and --vectorize must be >= 1")
    if args.stale_after <= 0 or args.storage_patience <= 0:
        raise ConfigError("--stale-after and --storage-patience must be > 0 seconds")
    spec = dataclasses.replace(spec, **overrides)
    flags.check_tunable([p.name for p in spec.parameters], args.config)
    base = flags.parse_args([*extra, "--job-dir", args.job_dir.rstrip("/")])  # bad trainer flags fail here
    if spec.metric != base.hpt_metric_tag:
        raise ConfigError(
            f"{args.config}: the study's metric is '{spec.metric}', but the trainer reports its validation accuracy "
            f"as '{base.hpt_metric_tag}'; use that metric id, or pass --hpt-metric-tag {spec.metric} after --"
        )
    name = args.study_name or Path(args.job_dir.rstrip("/")).name or "study"
    url = args.storage or default_storage(args.job_dir)
    store = StudyStore(spec, url, name, args.seed, args.stopping, args.stale_after, args.storage_patience)
    driver = Driver(store, base, extra)
    logger.info(
        f"study {name}: {spec.max_trials} trials, {search.describe(spec)}"
        + (f", {driver.rule} stopping" if driver.rule != "none" else "")
        + (f", {args.vectorize} lanes" if args.vectorize > 1 else f", {spec.parallel_trials} at a time")
    )
    return driver


def train(driver: Driver, vectorize: int) -> None:
    """Runs trials until none is left, waiting for trials other workers hold until they end or are taken over."""
    while True:
        if vectorize > 1:
            tune_lanes.run_lanes(driver, min(vectorize, driver.spec.max_trials))
        else:
            tune_processes.run_processes(driver, driver.spec.parallel_trials)
        if not driver.await_work():
            return


def finish(driver: Driver) -> int:
    """study.json, study.png and the leaderboard of a study this worker has nothing more to do for."""
    summary = driver.summary()
    driver.write_summary(summary)
    storage.write_bytes_atomic(storage.join(driver.job_dir, "study.png"), study_record.study_png(summary))
    if summary["status"] != Status.ACTIVE:  # every trial has its own checkpoint: no lane group is needed
        with contextlib.suppress(FileNotFoundError):
            fs, path = storage.filesystem(storage.join(driver.job_dir, flags.LANE_GROUPS_DIR))
            fs.rm(path, recursive=True)
    logger.info(study_record.leaderboard(summary))
    best = summary["best"]
    logger.info(
        f"best: trial {best['id']} {summary['metric']}={best['metric']:.4f} {best['params']}" if best else "best: none"
    )
    return 1 if summary["status"] == Status.FAILED else 0


def run(args: Any, extra: Sequence[str]) -> int:
    driver = open_driver(args, extra)
    try:
        train(driver, args.vectorize)
    except StorageDown:
        raise  # nothing can be handed back: the same command resumes this worker's trials
    except BaseException:
        driver.release_all()  # what this worker held resumes in the next one
        with contextlib.suppress(MnistJaxError):
            driver.write_summary(driver.summary())
        raise
    finally:
        if driver.scratch is not None:
            shutil.rmtree(driver.scratch, ignore_errors=True)
    return finish(driver)


def command(argv: list[str]) -> int:
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    args = build_parser().parse_args(own)
    if args.command == "convert":
        study, _ = load_study(args.config)
        print(yaml.safe_dump(to_vertex(study), sort_keys=False), end="")
        return 0
    log.configure(args.log_format, verbose=args.verbose)
    if not args.verbose:
        optuna.logging.disable_default_handler()
    return run(args, extra)


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(lambda: command(list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
