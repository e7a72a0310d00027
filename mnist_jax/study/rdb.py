"""Optuna's RDB storage as the study needs it: every use of Optuna's private API lives in this module.

Optuna's public API has no way to change a trial's state and attributes in
one transaction, to write an epoch's reports in one, or to show a pruner a
snapshot instead of the storage; so this module reaches inside:
- `ResilientStorage` rides through a database restart (each call retried with
  backoff for up to its patience) and adds the study's own transactions:
  `claim` (WAITING -> RUNNING with the claimer's attributes), `hand_back`
  (RUNNING -> WAITING if the trial's owner is still the one seen) and
  `write_batch` (measurements and attributes at once). They use
  `optuna.storages._rdb` (its models, `_create_scoped_session`, the storage's
  `scoped_session` and its `_set_trial_attr_without_commit` helper), and the
  retries cover the private methods Optuna's cache in front of RDB storage
  calls instead of the public ones;
- `View` stands in for a study when a pruner decides: pruners read
  `get_trials` and `direction` and write through the study's `_storage`;
- `trial_id` and `open_trial` give a trial's storage id and a `Trial` of it.
`PRIVATE_API` names each private name relied on; a test checks them against
the installed Optuna, so a release that changes one fails the suite, not a
shared study.
"""

from __future__ import annotations

import datetime
import functools
import json
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import optuna
from optuna.storages._rdb.models import (
    TrialIntermediateValueModel,
    TrialModel,
    TrialSystemAttributeModel,
    TrialUserAttributeModel,
)
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import FrozenTrial, TrialState

from mnist_jax.common.errors import MnistJaxError
from mnist_jax.common.log import logger

# How long a worker waits for a storage server that stopped answering (tune run --storage-patience).
PATIENCE_S = 300.0

# (module, attribute path) of every private Optuna name this module relies on.
PRIVATE_API = (
    ("optuna.storages._rdb.storage", "_create_scoped_session"),
    ("optuna.storages._rdb.models", "TrialModel.find_or_raise_by_id"),
    ("optuna.storages._rdb.models", "TrialSystemAttributeModel.find_by_trial_and_key"),
    ("optuna.storages._rdb.models", "TrialUserAttributeModel"),
    ("optuna.storages", "RDBStorage._set_trial_attr_without_commit"),
    ("optuna.storages._rdb.models", "TrialIntermediateValueModel.intermediate_value_to_stored_repr"),
    # Columns the batched measurements write directly.
    ("optuna.storages._rdb.models", "TrialIntermediateValueModel.step"),
    ("optuna.storages._rdb.models", "TrialIntermediateValueModel.intermediate_value_type"),
    ("optuna.storages", "RDBStorage._create_new_trial"),
    ("optuna.storages", "RDBStorage._set_trial_param"),
    ("optuna.storages", "RDBStorage._get_best_trial_id"),
    ("optuna.storages", "RDBStorage._get_trials"),
)


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    """A trial's id in its storage (Optuna keeps it private; every storage call takes it)."""
    return trial._trial_id


def open_trial(study: optuna.Study, trial_id: int) -> optuna.Trial:
    """A `Trial` of a slot this worker claimed, to draw its parameters and tell its end."""
    return optuna.Trial(study, trial_id)


def redact(url: str) -> str:
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


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


def _stored_attr(session: Any, trial: TrialModel, key: str) -> Any:
    """A trial's system attribute as a transaction reads it (None if it has none)."""
    attr = TrialSystemAttributeModel.find_by_trial_and_key(trial, key, session)
    return None if attr is None else json.loads(attr.value_json)


class ResilientStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage that rides through a server restart: each call that fails for a lost connection
    is retried with backoff, for up to `patience_s`; pooled connections are checked before use."""

    patience_s = PATIENCE_S

    def __init__(self, url: str) -> None:
        super().__init__(url, engine_kwargs={"pool_pre_ping": True})
        if url.startswith("sqlite:"):
            self._write_ahead()

    def _write_ahead(self) -> None:
        """SQLite in write-ahead mode, syncing at checkpoints rather than at every commit: a report per
        trial-epoch then costs no fsync, and a crash still leaves the database consistent."""
        import sqlalchemy

        def pragmas(connection: Any, record: Any) -> None:
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        sqlalchemy.event.listen(self.engine, "connect", pragmas)
        self.engine.dispose()  # connections opened before the listener get replaced

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

    # --- the study's own transactions -------------------------------------------------------

    def _change(self, trial_id: int, change: Callable[[Any, TrialModel], Any]) -> Any:
        """`change(session, trial)` on the trial's row, locked, in one transaction; retried whole after a lost
        connection."""

        def transaction() -> Any:
            with _create_scoped_session(self.scoped_session) as session:
                return change(session, TrialModel.find_or_raise_by_id(trial_id, session, for_update=True))

        return self.retry(transaction)

    def claim(self, trial_id: int, attrs: dict[str, Any], token_key: str, token: str) -> bool:
        """WAITING -> RUNNING with the system attributes `attrs` and the claim's `token`, in one transaction: no
        other worker ever sees the trial running without them. A retry after a lost connection knows a commit of
        its own by the token; False if the trial was not WAITING."""

        def claim(session: Any, trial: TrialModel) -> bool:
            if trial.state != TrialState.WAITING:
                return trial.state == TrialState.RUNNING and _stored_attr(session, trial, token_key) == token
            trial.state, trial.datetime_start = TrialState.RUNNING, datetime.datetime.now()
            for key, value in {**attrs, token_key: token}.items():
                self._set_trial_attr_without_commit(session, TrialSystemAttributeModel, trial_id, key, value)
            return True

        return self._change(trial_id, claim)

    def hand_back(self, trial_id: int, owner_key: str, owner: Any) -> None:
        """RUNNING -> WAITING, if the trial's `owner_key` attribute still holds `owner`: a trial that ended, or
        that another worker took over or claimed since, is left as it is."""

        def hand_back(session: Any, trial: TrialModel) -> None:
            if trial.state == TrialState.RUNNING and _stored_attr(session, trial, owner_key) == owner:
                trial.state = TrialState.WAITING

        self._change(trial_id, hand_back)

    def write_batch(
        self,
        values: Sequence[tuple[int, int, float]],
        system_attrs: Sequence[tuple[int, str, Any]] = (),
        user_attrs: Sequence[tuple[int, str, Any]] = (),
    ) -> None:
        """Stores (trial id, epoch, value) measurements and (trial id, key, value) attributes in one transaction
        (Optuna writes each in its own), all of it again after a lost connection: no report is lost."""

        def transaction() -> None:
            with _create_scoped_session(self.scoped_session, True) as session:
                self._write_measurements(session, values)
                for model, attrs in ((TrialSystemAttributeModel, system_attrs), (TrialUserAttributeModel, user_attrs)):
                    for trial_id, key, value in attrs:
                        self._set_trial_attr_without_commit(session, model, trial_id, key, value)

        self.retry(transaction)

    def _write_measurements(self, session: Any, values: Sequence[tuple[int, int, float]]) -> None:
        """What Optuna's `_set_trial_intermediate_value_without_commit` does for each (trial id, step, value), with two
        queries for the whole batch instead of two for each value (64 lanes' epoch: 80 against 15 ms)."""
        if not values:
            return
        ids = {trial_id for trial_id, _, _ in values}
        states = dict(session.query(TrialModel.trial_id, TrialModel.state).filter(TrialModel.trial_id.in_(ids)))
        for trial_id in ids:
            if trial_id not in states:
                raise KeyError(f"no trial with id {trial_id}")
            self.check_trial_is_updatable(trial_id, states[trial_id])
        model = TrialIntermediateValueModel
        steps = {step for _, step, _ in values}
        found = session.query(model).filter(model.trial_id.in_(ids), model.step.in_(steps))
        rows = {(row.trial_id, row.step): row for row in found}
        for trial_id, step, value in values:
            stored, kind = model.intermediate_value_to_stored_repr(value)
            row = rows.get((trial_id, step))
            if row is None:
                row = rows[trial_id, step] = model(trial_id=trial_id, step=step)
                session.add(row)
            row.intermediate_value, row.intermediate_value_type = stored, kind


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


def find(trials: list[FrozenTrial], trial_id: int) -> FrozenTrial | None:
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
        viewed = find(self.trials, trial_id)
        if viewed is not None:
            viewed.system_attrs[key] = value
        self.writes.append((trial_id, key, value))

    def prune(self, pruner: optuna.pruners.BasePruner, trial_id: int) -> bool:
        """`pruner`'s decision for the trial, on this view."""
        return pruner.prune(self, find(self.trials, trial_id))  # type: ignore[arg-type]
