"""The private Optuna names `mnist_jax.study.rdb` relies on, checked against the installed Optuna: a release that
renames or reshapes one fails here, by name, rather than in the middle of a shared study."""

from __future__ import annotations

import importlib
import inspect
import math
import re

import optuna
import pytest

from mnist_jax.study import rdb

# The leading parameters each private function is called with, in order.
CALLED_WITH = {
    "_create_scoped_session": ["scoped_session", "ignore_integrity_error"],
    "TrialModel.find_or_raise_by_id": ["trial_id", "session", "for_update"],
    "TrialSystemAttributeModel.find_by_trial_and_key": ["trial", "key", "session"],
    "RDBStorage._set_trial_attr_without_commit": ["self", "session", "model_cls", "trial_id", "key", "value"],
    "TrialIntermediateValueModel.intermediate_value_to_stored_repr": ["value"],
    "RDBStorage._create_new_trial": ["self", "study_id"],
    "RDBStorage._set_trial_param": ["self", "trial_id", "param_name"],
    "RDBStorage._get_best_trial_id": ["self", "study_id"],
    "RDBStorage._get_trials": ["self", "study_id"],
}


@pytest.mark.parametrize("module, path", rdb.PRIVATE_API, ids=[path for _, path in rdb.PRIVATE_API])
def test_each_private_optuna_name_the_adapter_uses_is_there_as_it_calls_it(module, path):
    found = importlib.import_module(module)
    for part in path.split("."):
        assert hasattr(found, part), f"optuna {optuna.__version__}: {module}.{path} is gone"
        found = getattr(found, part)
    if path in CALLED_WITH:
        expected = CALLED_WITH[path]
        assert list(inspect.signature(found).parameters)[: len(expected)] == expected, path


def test_every_private_name_the_adapter_calls_is_listed_and_checked():
    """Every private name of Optuna's storage that `rdb`'s source reaches for (`._name` where RDBStorage has
    `_name`) is in PRIVATE_API, so the check above covers it."""
    source = inspect.getsource(rdb)
    reached = {name for name in re.findall(r"\.(_[a-z][a-z_]*)", source) if hasattr(optuna.storages.RDBStorage, name)}
    listed = {path.rsplit(".", 1)[-1] for _, path in rdb.PRIVATE_API}
    assert reached and reached <= listed, reached - listed
    assert "_create_scoped_session" in source and "_create_scoped_session" in listed
    assert set(CALLED_WITH) <= {path for _, path in rdb.PRIVATE_API}


def test_a_trials_storage_id_and_the_pruners_write_path(tmp_path):
    """`trial_id` reads the id Optuna keeps private on both kinds of trial, and successive halving writes its rung
    through the study's `_storage`, which a `View` stands in for."""
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'db'}", direction="maximize")
    trial = study.ask()
    trial.report(0.5, 1)
    frozen = study.get_trials()[0]
    assert (
        rdb.trial_id(trial)
        == rdb.trial_id(frozen)
        == study._storage.get_trial_id_from_study_id_trial_number(study._study_id, 0)
    )
    view = rdb.View(study.get_trials(deepcopy=True), study.direction)
    pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    assert view.prune(pruner, rdb.trial_id(trial)) is False
    assert [(tid, key) for tid, key, _ in view.writes] == [(rdb.trial_id(trial), "completed_rung_0")]


def test_a_batch_of_measurements_is_stored_as_optuna_stores_each(tmp_path):
    """`write_batch` writes many trials' measurements with two queries: new steps are added, a step written
    again is replaced, NaN and infinities come back as Optuna stores them, and a finished or unknown trial
    refuses the whole batch."""
    storage = rdb.ResilientStorage(f"sqlite:///{tmp_path / 'db'}")
    study = optuna.create_study(storage=storage, direction="maximize")
    first, second = study.ask(), study.ask()
    ids = rdb.trial_id(first), rdb.trial_id(second)
    storage.write_batch([(ids[0], 1, 0.5), (ids[1], 1, float("nan")), (ids[0], 2, float("inf"))])
    storage.write_batch([(ids[0], 2, 0.75), (ids[1], 2, float("-inf"))], user_attrs=[(ids[1], "note", "x")])
    one, two = storage.get_trial(ids[0]), storage.get_trial(ids[1])
    assert one.intermediate_values == {1: 0.5, 2: 0.75}
    assert math.isnan(two.intermediate_values[1]) and two.intermediate_values[2] == float("-inf")
    assert two.user_attrs == {"note": "x"}
    study.tell(first, 0.75)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        storage.write_batch([(ids[0], 3, 0.8), (ids[1], 3, 0.1)])
    assert storage.get_trial(ids[1]).intermediate_values.keys() == {1, 2}  # nothing of the refused batch
    with pytest.raises(KeyError):
        storage.write_batch([(ids[1], 3, 0.1), (max(ids) + 1, 3, 0.1)])
    assert storage.get_trial(ids[1]).intermediate_values.keys() == {1, 2}
