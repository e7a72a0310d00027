"""The study in its storage: open or join it, take trial slots, reclaim a gone worker's trials, the heartbeat,
reports in one transaction per epoch, and an in-memory snapshot that stopping decisions read.

The study lives in Optuna RDB storage (SQLite by default, any RDB URL to share
it). When it is created it gets exactly maxTrials trial slots (a grid study,
its combinations), and workers take slots atomically (WAITING -> RUNNING), so
a study never runs more than maxTrials trials and no slot twice. Each worker
writes one heartbeat, a study attribute, at most every BEAT_S; a RUNNING trial
is handed back (WAITING, to resume from its checkpoints) when its worker is
gone: its process on this host, or its heartbeat older than STALE_AFTER_S
elsewhere.

A worker reads the study once per decision (`snapshot`), not once per trial:
the trials it runs are current in its own view (`record` adds each epoch's
values as they are decided), and the stopping rule reads that view through
`View`, so the reports themselves can be written later, in one transaction, on
the loop's background writer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import time
from collections.abc import Sequence
from typing import Any

import optuna
from optuna.storages._rdb.models import TrialSystemAttributeModel
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import FrozenTrial, TrialState

from mnist_jax import search
from mnist_jax.errors import ConfigError
from mnist_jax.study import Study, to_vertex
from mnist_jax.study_record import OWNER

# A trial whose worker on another host has not been heard from for this long is taken over.
STALE_AFTER_S = 600
BEAT_S = 30  # how often a worker's heartbeat is written
HEARTBEAT = "mnist_jax:heartbeat:"  # + the worker's host:pid, a study attribute
SPEC, READY = "mnist_jax:spec", "mnist_jax:ready"


def redact(url: str) -> str:
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


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

    @property
    def beat_key(self) -> str:
        return f"{HEARTBEAT}{self.host}:{self.pid}"

    def gone(self, heartbeat: float) -> bool:
        if self.host == socket.gethostname():
            return _process_start(self.pid) != self.started
        return time.time() - heartbeat > STALE_AFTER_S


def _write_ahead(store: optuna.storages.RDBStorage) -> None:
    """SQLite in write-ahead mode, syncing at checkpoints rather than at every commit: a report per
    trial-epoch then costs no fsync, and a crash still leaves the database consistent."""
    import sqlalchemy

    def pragmas(connection: Any, record: Any) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    sqlalchemy.event.listen(store.engine, "connect", pragmas)
    store.engine.dispose()  # connections opened before the listener get replaced


class View:
    """A study as Optuna's pruners read it, over a snapshot: `get_trials` and `direction` from memory; what
    a pruner writes (successive halving's rungs) lands in the snapshot and in `writes`, to store later."""

    def __init__(self, trials: list[FrozenTrial], direction: optuna.study.StudyDirection) -> None:
        self.trials, self.direction = trials, direction
        self.writes: list[tuple[int, str, Any]] = []
        self._storage = self  # pruners write through study._storage

    def get_trials(self, deepcopy: bool = False, states: Sequence[TrialState] | None = None) -> list[FrozenTrial]:
        return [t for t in self.trials if states is None or t.state in states]

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        for t in self.trials:
            if t._trial_id == trial_id:
                t.system_attrs[key] = value
        self.writes.append((trial_id, key, value))


class StudyStore:
    """One worker's handle on the study in its storage."""

    def __init__(self, spec: Study, storage_url: str, name: str, seed: int, stopping: str) -> None:
        self.spec, self.storage_url, self.name = spec, storage_url, name
        self.me = Worker.me()
        self.pruner = search.pruner(spec, stopping)
        self.study, self.storage = self._open(seed)
        self.study_id = self.storage.get_study_id_from_name(name)
        self.trials: list[FrozenTrial] = []  # the snapshot
        self.mine: dict[int, dict[int, float]] = {}  # this worker's measurements, by trial id, stored or not
        self.ended: dict[int, TrialState] = {}  # how this worker's trials ended, stored or not
        self.beaten = 0.0

    def _open(self, seed: int) -> tuple[optuna.Study, optuna.storages.RDBStorage]:
        for attempt in range(3):
            try:
                store = optuna.storages.RDBStorage(self.storage_url)
                if self.storage_url.startswith("sqlite:"):
                    _write_ahead(store)
                break
            except Exception as e:  # a bad URL, a missing driver, a server that does not answer
                # Workers that start together race to create the storage's tables: the loser retries.
                if attempt == 2:
                    raise ConfigError(f"cannot open study storage {redact(self.storage_url)}: {e}") from None
                time.sleep(1)
        spec = json.dumps(to_vertex(self.spec)["studySpec"] | {"maxTrialCount": self.spec.max_trials}, sort_keys=True)
        try:
            study = optuna.create_study(
                storage=store,
                study_name=self.name,
                direction=self.spec.goal.lower(),
                sampler=search.sampler(self.spec, seed),
                pruner=self.pruner,
            )
        except optuna.exceptions.DuplicatedStudyError:
            # Another worker's study: draw from another random stream, so no draw repeats one of its own.
            seed = int.from_bytes(os.urandom(4), "little")
            study = optuna.load_study(
                storage=store, study_name=self.name, sampler=search.sampler(self.spec, seed), pruner=self.pruner
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
                raise ConfigError(f"study {self.name} in {redact(self.storage_url)} was never set up")
            time.sleep(0.2)
        if store.get_study_system_attrs(study_id).get(SPEC) != spec:
            raise ConfigError(
                f"study {self.name} in {redact(self.storage_url)} was created from another study config or "
                "--max-trials; use the same ones, or a new --job-dir or --study-name"
            )

    # --- the snapshot ---------------------------------------------------------------

    def snapshot(self) -> list[FrozenTrial]:
        """Reads every trial once, with this worker's own measurements over it (stored or still on their way);
        decisions until the next snapshot use this view."""
        self.trials = self.study.get_trials(deepcopy=True)
        for t in self.trials:
            t.intermediate_values.update(self.mine.get(t._trial_id, {}))
            t.state = self.ended.get(t._trial_id, t.state)
        return self.trials

    def end(self, trial_id: int, state: TrialState) -> None:
        """Marks one of this worker's trials finished in its view, before (or after) the storage hears it."""
        self.ended[trial_id] = state
        for t in self.trials:
            if t._trial_id == trial_id:
                t.state = state

    def record(self, trial_id: int, epoch: int, value: float) -> bool:
        """Adds a measurement of one of this worker's trials to its view; False if the epoch was measured
        before (a resumed trial repeats the epochs after its checkpoint: the first measurement counts)."""
        known = self.mine.setdefault(trial_id, {})
        for t in self.trials:
            if t._trial_id == trial_id:
                known = {**t.intermediate_values, **known}
        if epoch in known:
            return False
        self.mine[trial_id][epoch] = value
        for t in self.trials:
            if t._trial_id == trial_id:
                t.intermediate_values[epoch] = value
        return True

    def should_stop(self, view: View, trial_id: int) -> bool:
        """The study's stopping rule, Optuna's pruner, on the view."""
        (trial,) = (t for t in view.trials if t._trial_id == trial_id)
        return self.pruner.prune(view, trial)  # type: ignore[arg-type]

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
        beats = self.storage.get_study_system_attrs(self.study_id)
        for t in self.trials:
            if t.state == TrialState.RUNNING:
                owner = t.system_attrs.get(OWNER)
                started = t.datetime_start.timestamp() if t.datetime_start else 0.0
                worker = Worker(**owner) if owner else None
                if worker is None or worker.gone(beats.get(worker.beat_key, started)):
                    self.storage.set_trial_state_values(t._trial_id, TrialState.WAITING)  # to resume
                    t.state = TrialState.WAITING
        for t in self.trials:
            if t.state != TrialState.WAITING:
                continue
            try:
                if not self.storage.set_trial_state_values(t._trial_id, TrialState.RUNNING):
                    continue  # another worker took it first
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
            resumed = OWNER in t.system_attrs
            self.storage.set_trial_system_attr(t._trial_id, OWNER, dataclasses.asdict(self.me))
            t.state, t.system_attrs[OWNER] = TrialState.RUNNING, dataclasses.asdict(self.me)
            self.ended.pop(t._trial_id, None)
            self.beat(force=not self.beaten)
            return t.number, t._trial_id, resumed
        return None

    def beat(self, force: bool = False) -> None:
        """Tells other workers this one is alive, at most every BEAT_S."""
        now = time.time()
        if force or now - self.beaten >= BEAT_S:
            self.storage.set_study_system_attr(self.study_id, self.me.beat_key, now)
            self.beaten = now

    def release(self, trial_id: int) -> None:
        """Gives an interrupted trial back to the study: the next worker resumes it from its checkpoint."""
        self.storage.set_trial_state_values(trial_id, TrialState.WAITING)
        self.end(trial_id, TrialState.WAITING)

    # --- writes ---------------------------------------------------------------------

    def report(self, values: Sequence[tuple[int, int, float]], attrs: Sequence[tuple[int, str, Any]] = ()) -> None:
        """Stores (trial id, epoch, value) measurements and (trial id, key, value) system attributes in one
        transaction (Optuna's RDB storage writes each in its own otherwise); then the heartbeat, when due."""
        with _create_scoped_session(self.storage.scoped_session, True) as session:
            for trial_id, epoch, value in values:
                self.storage._set_trial_intermediate_value_without_commit(session, trial_id, epoch, value)
            for trial_id, key, value in attrs:
                self.storage._set_trial_attr_without_commit(session, TrialSystemAttributeModel, trial_id, key, value)
        self.beat()
