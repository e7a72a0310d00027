"""The study in its storage: open or join it, take trial slots, reclaim a gone worker's trials, the heartbeat,
reports in one transaction per epoch, and an in-memory snapshot that stopping decisions read.

The study lives in Optuna RDB storage (SQLite by default, any RDB URL to share
it). When it is created it gets exactly maxTrials trial slots (a grid study,
its combinations), and workers take slots atomically (WAITING -> RUNNING, with
the worker that runs it, in one transaction), so a study never runs more than
maxTrials trials and no slot twice. Each worker writes one heartbeat, a study
attribute, four times per `stale_after_s`; a RUNNING trial is handed back
(WAITING, to resume from its checkpoints) when its worker is gone: its process
on this host, or its heartbeat older than `stale_after_s` elsewhere. A server
that restarts is ridden through (`ResilientStorage`: every call retried with
backoff for up to `patience_s`); one that stays down past it stops the worker
with `StorageDown`, in one line.

A worker reads the study once per decision (`snapshot`), not once per trial:
the trials it runs are current in its own view (`record` adds each epoch's
values as they are decided), and the stopping rule reads that view through
`View`, so the reports themselves can be written later, in one transaction, on
the loop's background writer.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import re
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import optuna
from optuna.storages._rdb.models import TrialModel, TrialSystemAttributeModel, TrialUserAttributeModel
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import FrozenTrial, TrialState

from mnist_jax import search
from mnist_jax.errors import ConfigError, MnistJaxError
from mnist_jax.log import logger
from mnist_jax.study import Study, to_vertex
from mnist_jax.study_record import OWNER

# A trial whose worker on another host has not been heard from for this long is taken over (tune run
# --stale-after); each worker writes its heartbeat BEATS_PER_STALE times in that span.
STALE_AFTER_S = 120.0
BEATS_PER_STALE = 4
# How long a worker waits for a storage server that stopped answering (tune run --storage-patience).
PATIENCE_S = 300.0
HEARTBEAT = "mnist_jax:heartbeat:"  # + the worker's host:pid, a study attribute
SPEC, READY = "mnist_jax:spec", "mnist_jax:ready"
CLAIM = "mnist_jax:claim"  # a trial's system attribute: the token of the claim that took it last


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

    def gone(self, heartbeat: float, stale_after_s: float) -> bool:
        if self.host == socket.gethostname():
            return _process_start(self.pid) != self.started
        return time.time() - heartbeat > stale_after_s


class StorageDown(MnistJaxError):
    """The study's storage server stopped answering for longer than the worker's patience."""


def _transient(error: BaseException) -> bool:
    """A failure a server restart or failover causes: a lost or refused connection, a rolled-back commit."""
    import sqlalchemy.exc

    if isinstance(error, optuna.exceptions.StorageInternalError):
        return True
    if isinstance(error, sqlalchemy.exc.DBAPIError) and error.connection_invalidated:
        return True
    return isinstance(error, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError)


def one_line(error: BaseException) -> str:
    """A database error's first line, without SQLAlchemy's pointer to its docs."""
    cause = getattr(error, "orig", None) or error.__cause__ or error
    text = str(cause).split("(Background on this error")[0]
    return " ".join(text.split())[:300]


class ResilientStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage that rides through a server restart: each call that fails for a lost connection
    is retried with backoff, for up to `patience_s`; pooled connections are checked before use."""

    patience_s = PATIENCE_S

    def __init__(self, url: str) -> None:
        super().__init__(url, engine_kwargs={"pool_pre_ping": True})

    def retry(self, call: Any, *args: Any, **kwargs: Any) -> Any:
        deadline, delay, warned = time.monotonic() + self.patience_s, 0.25, False
        while True:
            try:
                return call(*args, **kwargs)
            except Exception as e:
                if not _transient(e):
                    raise
                if time.monotonic() + delay > deadline:
                    raise StorageDown(
                        f"study storage {redact(self.url)} has not answered for {self.patience_s:g} s "
                        f"({one_line(e)}); rerun the same command once it is back: this worker's trials resume"
                    ) from None
                if not warned:
                    logger.warning(f"study storage {redact(self.url)} is not answering ({one_line(e)}); retrying")
                    warned = True
                time.sleep(delay)
                delay = min(2 * delay, 5.0)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Sequence[float] | None = None) -> bool:
        """Optuna's, retried. A retry that finds the trial already ended in `state` found the commit of an
        attempt whose answer the connection lost: the trial was told once, and that is success."""
        attempts = 0

        def attempt() -> bool:
            nonlocal attempts
            attempts += 1
            try:
                return optuna.storages.RDBStorage.set_trial_state_values(self, trial_id, state, values)
            except optuna.exceptions.UpdateFinishedTrialError:
                if attempts > 1 and self.get_trial(trial_id).state == state:
                    return True
                raise

        return self.retry(attempt)


def _retrying(name: str) -> Any:
    method = getattr(optuna.storages.RDBStorage, name)

    @functools.wraps(method)
    def call(self: ResilientStorage, *args: Any, **kwargs: Any) -> Any:
        return self.retry(method, self, *args, **kwargs)

    return call


for _name in (
    "create_new_study", "set_study_user_attr", "set_study_system_attr", "get_study_id_from_name",
    "get_study_name_from_id", "get_study_directions", "get_study_user_attrs", "get_study_system_attrs",
    "get_all_studies", "create_new_trial", "set_trial_param", "get_trial_param", "set_trial_intermediate_value",
    "set_trial_user_attr", "set_trial_system_attr", "get_trial_id_from_study_id_trial_number", "get_trial",
    "get_all_trials", "get_best_trial",
    # What Optuna's cache in front of RDB storage calls instead of the public methods:
    "_create_new_trial", "_set_trial_param", "_get_best_trial_id", "_get_trials",
):  # fmt: skip
    setattr(ResilientStorage, _name, _retrying(_name))


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


def _stored_attr(session: Any, trial: TrialModel, key: str) -> Any:
    """A trial's system attribute as a transaction reads it (None if it has none)."""
    attr = TrialSystemAttributeModel.find_by_trial_and_key(trial, key, session)
    return None if attr is None else json.loads(attr.value_json)


def _find(trials: list[FrozenTrial], trial_id: int) -> FrozenTrial | None:
    return next((t for t in trials if t._trial_id == trial_id), None)


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
        viewed = _find(self.trials, trial_id)
        if viewed is not None:
            viewed.system_attrs[key] = value
        self.writes.append((trial_id, key, value))


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
    ) -> None:
        self.spec, self.storage_url, self.name, self.seed = spec, storage_url, name, seed
        self.stale_after_s, self.patience_s = stale_after_s, patience_s
        self.me = Worker.me()
        self.rule = search.stopping(spec, stopping)  # in search.STOPPING's words
        self.pruner = search.pruner(spec, self.rule)
        self.study, self.storage = self._open(seed)
        self.study_id = self.storage.get_study_id_from_name(name)
        self.trials: list[FrozenTrial] = []  # the snapshot
        self.mine: dict[int, dict[int, float]] = {}  # this worker's measurements, by trial id, stored or not
        self.ended: dict[int, TrialState] = {}  # how this worker's trials ended, stored or not
        self.beaten = 0.0

    def _open(self, seed: int) -> tuple[optuna.Study, ResilientStorage]:
        for attempt in range(3):
            try:
                store = ResilientStorage(self.storage_url)
                if self.storage_url.startswith("sqlite:"):
                    _write_ahead(store)
                break
            except Exception as e:  # a bad URL or password, a missing driver, a server that does not answer
                # Workers that start together race to create the storage's tables: the loser retries.
                if attempt == 2:
                    raise ConfigError(f"cannot open study storage {redact(self.storage_url)}: {one_line(e)}") from None
                time.sleep(1)
        store.patience_s = self.patience_s  # from here on a server that goes away is waited for
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
        viewed = _find(self.trials, trial_id)
        if viewed is not None:
            viewed.state = state

    def record(self, trial_id: int, epoch: int, value: float) -> bool:
        """Adds a measurement of one of this worker's trials to its view; False if the epoch was measured
        before (a resumed trial repeats the epochs after its checkpoint: the first measurement counts)."""
        mine, viewed = self.mine.setdefault(trial_id, {}), _find(self.trials, trial_id)
        if epoch in mine or (viewed is not None and epoch in viewed.intermediate_values):
            return False
        mine[epoch] = value
        if viewed is not None:
            viewed.intermediate_values[epoch] = value
        return True

    def measurements(self, trial_id: int) -> dict[int, float]:
        """One of this worker's trials' measurements by epoch: a resumed trial's earlier epochs, as its worker
        before this one stored them, with this worker's over them."""
        viewed = _find(self.trials, trial_id)
        return {**(viewed.intermediate_values if viewed is not None else {}), **self.mine.get(trial_id, {})}

    def should_stop(self, view: View, trial_id: int) -> bool:
        """The study's stopping rule, Optuna's pruner, on the view."""
        return self.pruner.prune(view, _find(view.trials, trial_id))  # type: ignore[arg-type]

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

    def take_over(self) -> bool:
        """Hands back (to WAITING, to resume) the running trials in the snapshot whose worker is gone."""
        beats = self.storage.get_study_system_attrs(self.study_id)
        found = False
        for t in self.trials:
            if t.state == TrialState.RUNNING:
                owner = t.system_attrs.get(OWNER)
                started = t.datetime_start.timestamp() if t.datetime_start else 0.0
                worker = Worker(**owner) if owner else None
                if worker is None or worker.gone(beats.get(worker.beat_key, started), self.stale_after_s):
                    self._hand_back(t._trial_id, owner)
                    t.state, found = TrialState.WAITING, True
        return found

    def _take(self) -> tuple[int, int, bool] | None:
        self.take_over()
        for t in self.trials:
            if t.state != TrialState.WAITING or not self._claim(t._trial_id):
                continue  # another worker took it first
            resumed = OWNER in t.system_attrs
            if resumed:  # its earlier epochs, as the worker before this one left them
                t.intermediate_values.update(self.storage.get_trial(t._trial_id).intermediate_values)
            t.state, t.system_attrs[OWNER] = TrialState.RUNNING, dataclasses.asdict(self.me)
            self.ended.pop(t._trial_id, None)
            self.beat(force=not self.beaten)
            return t.number, t._trial_id, resumed
        return None

    def _claim(self, trial_id: int) -> bool:
        """WAITING -> RUNNING with this worker as its owner, in one transaction: no other worker ever sees the
        trial running without an owner (which `take_over` hands back). A retry after a lost connection knows
        a commit of its own by the claim's token; False if the trial was not WAITING."""
        token = uuid.uuid4().hex

        def claim(session: Any, trial: TrialModel) -> bool:
            if trial.state != TrialState.WAITING:
                return trial.state == TrialState.RUNNING and _stored_attr(session, trial, CLAIM) == token
            trial.state, trial.datetime_start = TrialState.RUNNING, datetime.datetime.now()
            for key, value in ((OWNER, dataclasses.asdict(self.me)), (CLAIM, token)):
                self.storage._set_trial_attr_without_commit(session, TrialSystemAttributeModel, trial_id, key, value)
            return True

        return self._change(trial_id, claim)

    def _change(self, trial_id: int, change: Callable[[Any, TrialModel], Any]) -> Any:
        """`change(session, trial)` on the trial's row, locked, in one transaction; retried whole after a lost
        connection."""

        def transaction() -> Any:
            with _create_scoped_session(self.storage.scoped_session) as session:
                return change(session, TrialModel.find_or_raise_by_id(trial_id, session, for_update=True))

        return self.storage.retry(transaction)

    def others_running(self) -> bool:
        """Whether the snapshot shows trials that other workers run (or ran: until they are taken over)."""
        mine = dataclasses.asdict(self.me)
        return any(t.state == TrialState.RUNNING and t.system_attrs.get(OWNER) != mine for t in self.trials)

    def beat(self, force: bool = False) -> None:
        """Tells other workers this one is alive, BEATS_PER_STALE times per `stale_after_s`."""
        now = time.time()
        if force or now - self.beaten >= self.stale_after_s / BEATS_PER_STALE:
            self.storage.set_study_system_attr(self.study_id, self.me.beat_key, now)
            self.beaten = now

    def release(self, trial_id: int) -> None:
        """Gives an interrupted trial back to the study: the next worker resumes it from its checkpoint."""
        self._hand_back(trial_id, dataclasses.asdict(self.me))
        self.end(trial_id, TrialState.WAITING)

    def _hand_back(self, trial_id: int, owner: dict[str, Any] | None) -> None:
        """RUNNING -> WAITING, if `owner` (as a trial's OWNER attribute records a worker) still runs it: a trial
        that ended, or that another worker took over or claimed since, is left as it is."""

        def hand_back(session: Any, trial: TrialModel) -> None:
            if trial.state == TrialState.RUNNING and _stored_attr(session, trial, OWNER) == owner:
                trial.state = TrialState.WAITING

        self._change(trial_id, hand_back)

    # --- writes ---------------------------------------------------------------------

    def report(
        self,
        values: Sequence[tuple[int, int, float]],
        system_attrs: Sequence[tuple[int, str, Any]] = (),
        user_attrs: Sequence[tuple[int, str, Any]] = (),
    ) -> None:
        """Stores (trial id, epoch, value) measurements and (trial id, key, value) attributes in one transaction
        (Optuna's RDB storage writes each in its own otherwise); then the heartbeat, when due."""
        store = self.storage

        def transaction() -> None:
            with _create_scoped_session(store.scoped_session, True) as session:
                for trial_id, epoch, value in values:
                    store._set_trial_intermediate_value_without_commit(session, trial_id, epoch, value)
                for model, attrs in ((TrialSystemAttributeModel, system_attrs), (TrialUserAttributeModel, user_attrs)):
                    for trial_id, key, value in attrs:
                        store._set_trial_attr_without_commit(session, model, trial_id, key, value)

        self.storage.retry(transaction)  # all of it again after a lost connection: no report is lost
        self.beat()
