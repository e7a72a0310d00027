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
from typing import TYPE_CHECKING, Any

import optuna

from mnist_jax import config as flags
from mnist_jax.errors import ConfigError
from mnist_jax.study import Status

if TYPE_CHECKING:
    from mnist_jax.loop import Outcome
    from mnist_jax.tune import Driver, Writes


class LaneSource:
    """The study as a training loop's trial source."""

    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        self.trials: dict[str, optuna.Trial] = {}
        self.writes: collections.deque[Writes] = collections.deque()  # decided, not yet reported

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
            os.makedirs(self.driver.local_dir(trial.number), exist_ok=True)
            return config
        return None

    def decide(self, ended: Sequence[tuple[flags.Config, dict[str, Any]]]) -> list[bool]:
        measured = [
            (self.trials[c.trial_id], r["epoch"], r["val_accuracy"], r["epoch"] >= c.epochs)  # type: ignore[index]
            for c, r in ended
        ]
        stops, writes = self.driver.decide(measured)
        self.writes.append(writes)
        return stops

    def report(self, ended: Sequence[tuple[flags.Config, dict[str, Any]]]) -> None:
        self.driver.write(self.writes.popleft())

    def say(self, config: flags.Config, message: str) -> None:
        """A lane's console lines go to its trial's train.log, as a trial process's would."""
        with open(self.driver.log_path(self.trials[config.trial_id].number), "a") as f:  # type: ignore[index]
            f.write(message + "\n")

    def trial_done(self, config: flags.Config, outcome: Outcome) -> None:
        trial = self.trials.pop(config.trial_id)  # type: ignore[arg-type]
        self.driver.keep_log(trial.number)
        self.driver.tell(trial, outcome.status, outcome.error)


def run_lanes(driver: Driver, lanes: int) -> None:
    """Runs the study's trials in `lanes` lanes of one training program (imports JAX)."""
    from mnist_jax import loop, parallel, steps

    shared = sorted({flags.field_name(p.name) for p in driver.spec.parameters} & set(flags.SHARED))
    if shared:
        raise ConfigError(f"--vectorize: trials trained together must share {', '.join(shared)}; the study tunes it")
    parallel.initialize(driver.base)
    steps.enable_compile_cache()
    loop.train_lanes(driver.base, LaneSource(driver), lanes)
