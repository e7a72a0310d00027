"""Trials in lanes: the study as the training loop's trial source (`tune run --vectorize K`).

Slots become lanes' trials and epochs become reports. The loop asks
`decide` between an epoch's host sync and the next dispatch: it records
the epoch's measurements in the worker's view of the study and takes every
lane's stopping decision from one snapshot, with no write. The writes (the
epoch's reports in one transaction, trial results, each trial's `train.log`)
come through `report`, `trial_done` and `say` on the loop's background writer.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Sequence
from typing import IO, Any

import optuna

from mnist_jax.common.errors import ConfigError
from mnist_jax.common.status import Status
from mnist_jax.study.driver import Driver, Writes
from mnist_jax.training import config as flags
from mnist_jax.training.source import Outcome, TrialSource

METRIC = "val_accuracy"  # a record's study metric: the validation split's accuracy, or the test set's


class LaneSource(TrialSource):
    """The study as a training loop's trial source."""

    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        self.trials: dict[str, optuna.Trial] = {}
        self.writes: collections.deque[Writes] = collections.deque()  # decided, not yet reported
        self.logs: dict[str, IO[str]] = {}  # each trial's train.log, open while it trains (on the writer)

    def next_trial(self) -> flags.Config | None:
        while (trial := self.driver.pop()) is not None:
            argv, env = self.driver.trial_args(trial)
            try:
                config = flags.parse_args(argv, {**os.environ, **env})
            except ConfigError as e:
                self.driver.tell(trial, Status.FAILED, str(e))
                continue
            if config.hpt_metric_tag != self.driver.spec.metric:
                self.driver.tell(
                    trial, Status.FAILED, f"trial reports '{config.hpt_metric_tag}', not '{self.driver.spec.metric}'"
                )
                continue
            self.trials[config.trial_id] = trial  # type: ignore[index]
            os.makedirs(self.driver.dirs.local_dir(trial.number), exist_ok=True)
            return config
        return None

    def decide(self, ended: Sequence[tuple[flags.Config, dict[str, Any]]]) -> list[bool]:
        measured = [
            (self.trials[c.trial_id], r["epoch"], r[METRIC], r["epoch"] >= c.epochs)  # type: ignore[index]
            for c, r in ended
        ]
        stops, writes = self.driver.decide(measured)
        self.writes.append(writes)
        return stops

    def report(self, ended: Sequence[tuple[flags.Config, dict[str, Any]]]) -> None:
        self.driver.write(self.writes.popleft())

    def say(self, config: flags.Config, message: str) -> None:
        """A lane's console lines go to its trial's train.log, as a trial process's would (each line whole, as it
        comes)."""
        log = self.logs.get(config.trial_id)  # type: ignore[arg-type]
        if log is None:
            path = self.driver.dirs.log_path(self.trials[config.trial_id].number)  # type: ignore[index]
            log = self.logs[config.trial_id] = open(path, "a", buffering=1)  # noqa: SIM115  # closed in trial_done
        log.write(message + "\n")

    def trial_done(self, config: flags.Config, outcome: Outcome) -> None:
        trial = self.trials.pop(config.trial_id)  # type: ignore[arg-type]
        self.close_log(config.trial_id)  # type: ignore[arg-type]
        self.driver.dirs.keep_log(trial.number)
        self.driver.tell(trial, outcome.status, outcome.error)

    def close_log(self, trial: str) -> None:
        log = self.logs.pop(trial, None)
        if log is not None:
            log.close()


def run_lanes(driver: Driver, lanes: int, source: LaneSource | None = None) -> None:
    """Runs the study's trials in `lanes` lanes of one training program (imports JAX), fed by `source` (by
    default the study's trials one after another)."""
    from mnist_jax.training import loop, parallel, steps

    shared = sorted({flags.field_name(p.name) for p in driver.spec.parameters} & set(flags.SHARED))
    if shared:
        raise ConfigError(f"--vectorize: trials trained together must share {', '.join(shared)}; the study tunes it")
    parallel.initialize(driver.base)
    steps.enable_compile_cache()
    source = source or LaneSource(driver)
    try:
        loop.train_lanes(driver.base, source, lanes)
    finally:  # trials handed back still in their lanes
        for trial in list(source.logs):
            source.close_log(trial)
