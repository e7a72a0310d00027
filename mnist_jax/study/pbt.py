"""A population-based training study in lanes (`tune run --pbt`): the population as the loop's trial source.

Every member is a trial of the study, all in lanes of one program at once.
Every `perturb_every` epochs, `perturb` decides the exploits
(`population.exploits`) from the epoch's one host sync, and the loop applies
them on the device in one program: no checkpoint, no process, no recompile.
The study's job dir holds `pbt.jsonl` (one line per exploit, rewritten
atomically on the writer thread before any group save that covers it) and,
at the end, `pbt.png`; each member's job dir holds its `schedule.json`.

Resuming: a member resumes from its lane group's copy (every member from the
same epoch) with the settings in force then (`resumed`), and the exploits
after that epoch are drawn again, as they were (the draws at an epoch depend
on the study's seed and that epoch alone). A PBT study runs under one driver.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Sequence
from typing import Any

from optuna.trial import TrialState

from mnist_jax.common import storage
from mnist_jax.common.errors import ConfigError
from mnist_jax.common.status import Status
from mnist_jax.study import population, record
from mnist_jax.study.driver import Driver
from mnist_jax.study.heartbeat import OWNER, Worker
from mnist_jax.study.lanes import METRIC, LaneSource, run_lanes
from mnist_jax.study.population import Exploit
from mnist_jax.training import config as flags
from mnist_jax.training.source import Outcome, Perturbation

HISTORY_FILE = "pbt.jsonl"
SCHEDULE_FILE = "schedule.json"


def member(config: flags.Config) -> int:
    """A member's trial id, as study.json, pbt.jsonl and schedule.json number it (every member has one)."""
    return int(config.trial_id)  # type: ignore[arg-type]


class PopulationSource(LaneSource):
    """The study's trials as a population: members trained in lockstep, the weak replaced by the strong."""

    lockstep = True

    def __init__(self, driver: Driver, perturb_every: int, quantile: float) -> None:
        super().__init__(driver)
        self.perturb_every, self.quantile = perturb_every, quantile
        self.history_path = storage.join(driver.dirs.job_dir, HISTORY_FILE)
        self.history = read_history(self.history_path)
        self.unwritten: list[Exploit] | None = None  # the history, when pbt.jsonl lags behind it
        self.lock = threading.Lock()  # `perturb` hands the history over, `report` takes it, on two threads
        self.initial: dict[int, dict[str, float]] = {}  # member -> its first settings
        self.seeds: dict[int, int] = {}

    def next_trial(self) -> flags.Config | None:
        config = super().next_trial()
        if config is None:
            return None
        number = member(config)
        config = dataclasses.replace(config, seed=population.member_seed(self.driver.base, number - 1))
        self.initial[number], self.seeds[number] = population.settings(config), config.seed
        return config

    def resumed(self, config: flags.Config, epoch: int) -> tuple[flags.Config, str | None]:
        number = member(config)
        in_force = population.settings_at(number, epoch, self.initial[number], self.history)
        parent = next((e.donor for e in self.history if e.member == number and e.epoch == epoch), None)
        return dataclasses.replace(config, **in_force), None if parent is None else str(parent)

    def perturb(self, ended: Sequence[tuple[flags.Config, dict[str, Any]]]) -> list[Perturbation]:
        epoch = ended[0][1]["epoch"]
        if epoch % self.perturb_every or epoch >= ended[0][0].epochs:
            return []
        members = {member(config): config for config, _ in ended}
        metrics = {member(config): record[METRIC] for config, record in ended}
        current = {number: population.settings(config) for number, config in members.items()}
        spec, seed = self.driver.spec, self.driver.store.seed
        exploits = population.exploits(spec, epoch, metrics, current, seed, self.quantile)
        # What a killed run drew from this epoch on is drawn again, the same way.
        self.history = [e for e in self.history if e.epoch < epoch] + exploits
        with self.lock:
            self.unwritten = self.history
        return [
            Perturbation(members[e.member], members[e.donor], dataclasses.replace(members[e.member], **e.after))
            for e in exploits
        ]

    def report(self, ended: Sequence[tuple[flags.Config, dict[str, Any]]]) -> None:
        super().report(ended)
        with self.lock:
            history, self.unwritten = self.unwritten, None
        if history is not None:
            lines = "".join(json.dumps(e.to_json()) + "\n" for e in history)
            storage.write_bytes_atomic(self.history_path, lines.encode())

    def trial_done(self, config: flags.Config, outcome: Outcome) -> None:
        if outcome.status == Status.SUCCEEDED:
            self.recall_members()
            number = member(config)
            recipe = {
                "member": number,
                "epochs": outcome.epochs,
                **{key: getattr(config, key) for key in flags.SHARED if key != "train_file"},
                "spans": population.schedule(number, outcome.epochs, self.initial, self.seeds, self.history),
            }
            text = json.dumps(recipe, indent=2) + "\n"
            storage.write_bytes_atomic(storage.join(config.job_dir, SCHEDULE_FILE), text.encode())
        super().trial_done(config, outcome)

    def recall_members(self) -> None:
        """The first settings and seeds of members this run did not start (they ended before it): from the
        study's storage, as `next_trial` made them."""
        if len(self.initial) == self.driver.spec.max_trials:
            return
        base = self.driver.base
        for t in self.driver.store.study.get_trials(deepcopy=False):
            member = t.number + 1
            if member not in self.initial and "params" in t.user_attrs:
                drawn = {flags.field_name(name): value for name, value in t.user_attrs["params"].items()}
                self.initial[member] = {**population.settings(base), **drawn}
                self.seeds[member] = population.member_seed(base, t.number)


def read_history(path: str) -> list[Exploit]:
    """The exploits `pbt.jsonl` holds (none when there is none yet)."""
    if not storage.exists(path):
        return []
    return [Exploit.from_json(json.loads(line)) for line in storage.read_bytes(path).decode().splitlines() if line]


def check_sole_driver(driver: Driver) -> None:
    """A PBT study's members train in one program: a second worker could only hold members back."""
    store = driver.store
    store.snapshot()
    beats = store.storage.get_study_system_attrs(store.study_id)
    for t in store.trials:
        owner = t.system_attrs.get(OWNER)
        if t.state != TrialState.RUNNING or not owner or owner == dataclasses.asdict(store.me):
            continue
        worker = Worker(**owner)
        started = t.datetime_start.timestamp() if t.datetime_start else 0.0
        if not worker.gone(beats.get(worker.beat_key, started), store.stale_after_s):
            raise ConfigError(
                f"study {store.name} is population-based training, and worker {worker.host}:{worker.pid} runs it; "
                "a PBT study runs under one driver"
            )


def run_population(driver: Driver, perturb_every: int, quantile: float) -> None:
    """Trains the study's population, every member in a lane of one program; then draws `pbt.png`."""
    check_sole_driver(driver)
    run_lanes(driver, driver.spec.max_trials, PopulationSource(driver, perturb_every, quantile))
    summary = driver.summary()
    if summary["best"] is None:
        return
    recipe = json.loads(storage.read_bytes(storage.join(summary["best"]["job_dir"], SCHEDULE_FILE)))
    history = [e.to_json() for e in read_history(storage.join(driver.dirs.job_dir, HISTORY_FILE))]
    picture = record.pbt_png(summary, history, recipe["spans"])
    storage.write_bytes_atomic(storage.join(driver.dirs.job_dir, "pbt.png"), picture)
