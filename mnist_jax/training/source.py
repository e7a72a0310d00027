"""The seam between the training loop and where its trials come from.

The job is one trial (`job.OneTrial`), or a population member's recipe
replayed (`job.ScheduleTrial`); a study in lanes is many
(`mnist_jax.study.lanes.LaneSource`, `mnist_jax.study.pbt.PopulationSource`).
The loop asks a `TrialSource` for trials and decisions, and tells it how each
epoch and each trial went; an `Outcome` says how a trial left its lane, a
`Perturbation` how a lane changes between two epochs.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any, NamedTuple

from mnist_jax.common.status import Status
from mnist_jax.training.config import Config


class Outcome(NamedTuple):
    """How a trial left its lane."""

    status: Status  # SUCCEEDED, STOPPED or FAILED
    epochs: int  # completed epochs
    error: str | None = None  # when FAILED


class Perturbation(NamedTuple):
    """Before the next epoch, `member`'s lane takes `donor`'s lane's state (params, optimizer state, step; not
    its random stream), then trains with `config`'s settings (learning rate and dropout rates); with `stream`,
    its shuffles and dropout masks follow that seed's stream from here on."""

    member: Config  # the lane's config now (the loop finds the lane by it)
    donor: Config | None  # None: the member keeps its own state
    config: Config  # the member's settings from the next epoch on
    stream: int | None = None  # a seed whose random stream the member takes


class TrialSource(abc.ABC):
    """Where a loop's trials come from, and who hears how they go. `lockstep`: its trials train together (a
    population), so lanes that finish or are preempted together are saved as one group first, and a kill among
    their own saves and exports resumes them all from one epoch.

    `next_trial`, `resumed`, `decide` and `perturb` run on the loop's own
    thread, between an epoch's host sync and the next epoch's dispatch, so they
    must not wait on I/O; `report`, `trial_done` and `say` run in order on the
    loop's background writer, while the device trains.
    """

    lockstep = False

    @abc.abstractmethod
    def next_trial(self) -> Config | None:
        """The next trial for a free lane; None when there is none (the lane stays free)."""

    def resumed(self, config: Config, epoch: int) -> tuple[Config, str | None]:
        """`config`'s trial as it resumes after `epoch` from its checkpoint: its settings in force then, and the
        trial whose state it took at that epoch, if it took one."""
        return config, None

    def decide(self, ended: Sequence[tuple[Config, dict[str, Any]]]) -> list[bool]:
        """Which of the trials that just ended an epoch (with these records) stop here."""
        return [False] * len(ended)

    def perturb(self, ended: Sequence[tuple[Config, dict[str, Any]]]) -> list[Perturbation]:
        """How the trials that just ended an epoch change before the next one (none by default)."""
        return []

    def report(self, ended: Sequence[tuple[Config, dict[str, Any]]]) -> None:
        """Hears an epoch's records, all lanes at once."""
        return None  # a source that decides nothing from them need not hear them

    @abc.abstractmethod
    def trial_done(self, config: Config, outcome: Outcome) -> None:
        """Hears that a trial left its lane; its outputs are complete."""

    @abc.abstractmethod
    def say(self, config: Config, message: str) -> None:
        """Writes a line of a trial's console output (its epochs, its result) where that trial's output goes."""
