"""The study in its storage: open or join it, take trial slots, take over a gone worker's trials, the heartbeat,
an in-memory snapshot that stopping decisions read, and reports in one transaction per epoch.

The study lives in Optuna RDB storage (SQLite by default, any RDB URL to share
it). When it is created it gets exactly maxTrials trial slots (a grid study,
its combinations), and workers take slots atomically (`ResilientStorage.claim`),
so a study never runs more than maxTrials trials and no slot twice. A RUNNING
trial is handed back (WAITING, to resume from its checkpoints) when its worker
is gone (`heartbeat`). A server that restarts is ridden through; one that stays
down past `--storage-patience` stops the worker with `StorageDown`, in one line.

A worker reads the study once per decision (`snapshot`), not once per trial:
the trials it runs are current in its own view (`record` adds each epoch's
values as they are decided), and the stopping rule reads that view through
`rdb.View`, so the reports themselves can be written later, in one
transaction, on the loop's background writer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import uuid
from collections.abc import Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from mnist_jax.common.errors import ConfigError
from mnist_jax.study import search
from mnist_jax.study.heartbeat import BEATS_PER_STALE, OWNER, STALE_AFTER_S, Worker
from mnist_jax.study.rdb import PATIENCE_S, ResilientStorage, View, find, one_line, redact, trial_id
from mnist_jax.study.spec import Study, to_vertex

SPEC, READY = "mnist_jax:spec", "mnist_jax:ready"
CLAIM = "mnist_jax:claim"  # a trial's system attribute: the token of the claim that took it last


def _connect(url: str, patience_s: float) -> ResilientStorage:
    for attempt in range(3):
        try:
            storage = ResilientStorage(url)
            break
        except Exception as e:  # a bad URL or password, a missing driver, a server that does not answer
            # Workers that start together race to create the storage's tables: the loser retries.
            if attempt == 2:
                raise ConfigError(f"cannot open study storage {redact(url)}: {one_line(e)}") from None
            time.sleep(1)
    storage.patience_s = patience_s  # from here on a server that goes away is waited for
    return storage


def open_study(
    spec: Study,
    url: str,
    name: str,
    seed: int,
    pruner: optuna.pruners.BasePruner,
    patience_s: float,
    population: dict[str, Any] | None,
) -> tuple[optuna.Study, ResilientStorage]:
    """The study `name` in the storage at `url`: created with its slots, or joined once its creator has set it
    up (then it must have been made from the same spec, and the same population settings)."""
    storage = _connect(url, patience_s)
    recorded = to_vertex(spec)["studySpec"] | {"maxTrialCount": spec.max_trials, "population": population}
    recorded = json.dumps(recorded, sort_keys=True)
    direction = spec.goal.lower()
    try:
        study = optuna.create_study(
            storage=storage, study_name=name, direction=direction, sampler=search.sampler(spec, seed), pruner=pruner
        )
    except optuna.exceptions.DuplicatedStudyError:
        # Another worker's study: draw from another random stream, so no draw repeats one of its own.
        seed = int.from_bytes(os.urandom(4), "little")
        study = optuna.load_study(storage=storage, study_name=name, sampler=search.sampler(spec, seed), pruner=pruner)
        study_id = storage.get_study_id_from_name(name)
        deadline = time.monotonic() + 60
        while not storage.get_study_system_attrs(study_id).get(READY):
            if time.monotonic() > deadline:
                raise ConfigError(f"study {name} in {redact(url)} was never set up") from None
            time.sleep(0.2)
        if storage.get_study_system_attrs(study_id).get(SPEC) != recorded:
            raise ConfigError(
                f"study {name} in {redact(url)} was created from another study config, --max-trials or --pbt "
                "settings; use the same ones, or a new --job-dir or --study-name"
            ) from None
        return study, storage
    study.set_user_attr("algorithm", spec.algorithm)
    study.set_user_attr("search", search.describe(spec))
    study_id = storage.get_study_id_from_name(name)
    storage.set_study_system_attr(study_id, SPEC, recorded)
    slots = search.grid(spec)[: spec.max_trials] if spec.algorithm == "GRID_SEARCH" else None
    for params in slots or [{}] * spec.max_trials:
        study.enqueue_trial(params)
    storage.set_study_system_attr(study_id, READY, True)
    return study, storage


class StudyStore:
    """One worker's handle on the study in its storage."""

    def __init__(
        self,
        spec: Study,
        storage_url: str,
        name: str,
        seed: int,
        stopping: str,
        stale_after_s: float = STALE_AFTER_S,
        patience_s: float = PATIENCE_S,
        population: dict[str, Any] | None = None,
    ) -> None:
        self.spec, self.storage_url, self.name, self.seed = spec, storage_url, name, seed
        self.population = population  # population-based training's settings, or None
        self.stale_after_s = stale_after_s
        self.me = Worker.me()
        self.rule = search.stopping(spec, stopping)  # in search.STOPPING's words
        self.pruner = search.pruner(spec, self.rule)
        self.study, self.storage = open_study(spec, storage_url, name, seed, self.pruner, patience_s, population)
        self.study_id = self.storage.get_study_id_from_name(name)
        self.trials: list[FrozenTrial] = []  # the snapshot
        self.mine: dict[int, dict[int, float]] = {}  # this worker's measurements, by trial id, stored or not
        self.ended: dict[int, TrialState] = {}  # how this worker's trials ended, stored or not
        self.beaten = 0.0

    # --- the snapshot ---------------------------------------------------------------

    def snapshot(self) -> list[FrozenTrial]:
        """Reads every trial once, with this worker's own measurements over it (stored or still on their way);
        decisions until the next snapshot use this view."""
        self.trials = self.study.get_trials(deepcopy=True)
        for t in self.trials:
            t.intermediate_values.update(self.mine.get(trial_id(t), {}))
            t.state = self.ended.get(trial_id(t), t.state)
        return self.trials

    def view(self) -> View:
        return View(self.trials, self.study.direction)

    def end(self, trial: int, state: TrialState) -> None:
        """Marks one of this worker's trials finished in its view, before (or after) the storage hears it."""
        self.ended[trial] = state
        viewed = find(self.trials, trial)
        if viewed is not None:
            viewed.state = state

    def record(self, trial: int, epoch: int, value: float) -> bool:
        """Adds a measurement of one of this worker's trials to its view; False if the epoch was measured
        before (a resumed trial repeats the epochs after its checkpoint: the first measurement counts)."""
        mine, viewed = self.mine.setdefault(trial, {}), find(self.trials, trial)
        if epoch in mine or (viewed is not None and epoch in viewed.intermediate_values):
            return False
        mine[epoch] = value
        if viewed is not None:
            viewed.intermediate_values[epoch] = value
        return True

    def measurements(self, trial: int) -> dict[int, float]:
        """One of this worker's trials' measurements by epoch: a resumed trial's earlier epochs, as its worker
        before this one stored them, with this worker's over them."""
        viewed = find(self.trials, trial)
        return {**(viewed.intermediate_values if viewed is not None else {}), **self.mine.get(trial, {})}

    def should_stop(self, view: View, trial: int) -> bool:
        """The study's stopping rule, Optuna's pruner, on the view."""
        return view.prune(self.pruner, trial)

    # --- slots ------------------------------------------------------------------------

    def failures(self) -> int:
        return sum(t.state == TrialState.FAIL for t in self.trials)

    def take(self) -> tuple[int, int, bool] | None:
        """Takes the next trial slot (an interrupted trial first): (number, trial id, resumed), or None.

        Slots are looked up in the snapshot, read again only when it offers none: taking is atomic in the
        storage, so a slot another worker took since is skipped."""
        for fresh in (False, True):
            if fresh or not self.trials:
                self.snapshot()
            if self.failures() >= self.spec.max_failed_trials:
                return None
            taken = self._take()
            if taken is not None or fresh:
                return taken
        return None

    def _take(self) -> tuple[int, int, bool] | None:
        self.take_over()
        me = dataclasses.asdict(self.me)
        for t in self.trials:
            if t.state != TrialState.WAITING or not self.storage.claim(
                trial_id(t), {OWNER: me}, CLAIM, uuid.uuid4().hex
            ):
                continue  # another worker took it first
            resumed = OWNER in t.system_attrs
            if resumed:  # its earlier epochs, as the worker before this one left them
                t.intermediate_values.update(self.storage.get_trial(trial_id(t)).intermediate_values)
            t.state, t.system_attrs[OWNER] = TrialState.RUNNING, me
            self.ended.pop(trial_id(t), None)
            self.beat(force=not self.beaten)
            return t.number, trial_id(t), resumed
        return None

    def take_over(self) -> bool:
        """Hands back (to WAITING, to resume) the running trials in the snapshot whose worker is gone."""
        others = self.others_running()
        if not others:  # this worker is alive: the heartbeats are read only when another's trials may be left
            return False
        beats = self.storage.get_study_system_attrs(self.study_id)
        found = False
        for t in others:
            owner = t.system_attrs.get(OWNER)
            started = t.datetime_start.timestamp() if t.datetime_start else 0.0
            worker = Worker(**owner) if owner else None
            if worker is None or worker.gone(beats.get(worker.beat_key, started), self.stale_after_s):
                self.storage.hand_back(trial_id(t), OWNER, owner)
                t.state, found = TrialState.WAITING, True
        return found

    def others_running(self) -> list[FrozenTrial]:
        """The trials in the snapshot that other workers run (or ran: until they are taken over)."""
        mine = dataclasses.asdict(self.me)
        return [t for t in self.trials if t.state == TrialState.RUNNING and t.system_attrs.get(OWNER) != mine]

    def release(self, trial: int) -> None:
        """Gives an interrupted trial back to the study: the next worker resumes it from its checkpoint."""
        self.storage.hand_back(trial, OWNER, dataclasses.asdict(self.me))
        self.end(trial, TrialState.WAITING)

    # --- writes ---------------------------------------------------------------------

    def beat(self, force: bool = False) -> None:
        """Tells other workers this one is alive, BEATS_PER_STALE times per `stale_after_s`."""
        now = time.time()
        if force or now - self.beaten >= self.stale_after_s / BEATS_PER_STALE:
            self.storage.set_study_system_attr(self.study_id, self.me.beat_key, now)
            self.beaten = now

    def report(self, *batch: Sequence[tuple]) -> None:
        """Stores measurements and attributes in one transaction (`ResilientStorage.write_batch`, which takes
        `batch`); then the heartbeat, when due."""
        self.storage.write_batch(*batch)
        self.beat()
