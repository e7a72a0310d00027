"""The private Optuna names `mnist_jax.study.rdb` relies on, checked against the installed Optuna: a release that
renames or reshapes one fails here, by name, rather than in the middle of a shared study."""

from __future__ import annotations

import importlib
import inspect
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
    "RDBStorage._set_trial_intermediate_value_without_commit": ["self", "session", "trial_id", "step"],
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
