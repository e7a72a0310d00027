"""The study in its storage, in this process: two workers on one SQLite storage, slots taken once each,
reports in one transaction, stopping decisions from a snapshot through Optuna's pruners, and the record."""

from __future__ import annotations

import contextlib
import dataclasses
import time

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from mnist_jax.study import rdb
from mnist_jax.study import record as study_record
from mnist_jax.study import spec as study
from mnist_jax.study.heartbeat import OWNER
from mnist_jax.study.rdb import View
from mnist_jax.study.store import StudyStore

optuna.logging.set_verbosity(optuna.logging.WARNING)

SPEC = study.Study(
    "MAXIMIZE",
    "accuracy",
    (study.Parameter("learning-rate", "DOUBLE", 1e-4, 1e-2, scale="UNIT_LOG_SCALE"),),
    6,
    2,
    3,
    algorithm="RANDOM_SEARCH",
)


def _workers(tmp_path, stopping="none", n=2):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    return [StudyStore(SPEC, url, "s", seed, stopping) for seed in range(n)]


def test_two_workers_take_every_slot_once_and_exactly_max_trials(tmp_path):
    a, b = _workers(tmp_path)
    taken = []
    while True:
        got = [w.take() for w in (a, b)]
        taken += [t for t in got if t is not None]
        if got == [None, None]:
            break
    numbers = sorted(number for number, _, _ in taken)
    assert numbers == list(range(SPEC.max_trials))  # each slot once, no more than maxTrialCount
    assert not any(resumed for _, _, resumed in taken)
    # Both heartbeats are in the study, one per worker, not one per trial.
    beats = [k for k in a.storage.get_study_system_attrs(a.study_id) if k.startswith("mnist_jax:heartbeat:")]
    assert len(beats) == 1  # one process here: both handles are the same worker


def test_a_released_trial_is_taken_again_as_resumed(tmp_path):
    (a,) = _workers(tmp_path, n=1)
    number, trial_id, resumed = a.take()
    a.release(trial_id)
    a.snapshot()
    assert a.take() == (number, trial_id, True)


def _lose_the_first_written_answer(monkeypatch, module, store) -> list[bool]:
    """Makes the first transaction that writes, through `module`'s sessions on `store`, commit and then lose its
    connection before the answer, as a server restart can; returns a list that says when that happened."""
    opened = module._create_scoped_session
    lost: list[bool] = []
    wrote: list[str] = []

    def statement(conn, cursor, sql, *args) -> None:
        if sql.lstrip().split(None, 1)[0].upper() in ("INSERT", "UPDATE", "DELETE"):
            wrote.append(sql)

    sqlalchemy.event.listen(store.engine, "before_cursor_execute", statement)

    @contextlib.contextmanager
    def losing(*args, **kwargs):
        wrote.clear()
        with opened(*args, **kwargs) as session:
            yield session
        if wrote and not lost:  # committed
            lost.append(True)
            raise sqlalchemy.exc.OperationalError("COMMIT", {}, ConnectionResetError("connection lost"))

    monkeypatch.setattr(module, "_create_scoped_session", losing)
    return lost


def test_a_claim_whose_answer_the_connection_lost_is_still_this_workers(tmp_path, monkeypatch):
    """The first claim commits, then its connection drops before the answer: the retry finds its own claim,
    so the slot is taken once and is not left running with no worker to finish it."""
    (a,) = _workers(tmp_path, n=1)
    lost = _lose_the_first_written_answer(monkeypatch, rdb, a.storage)
    number, trial_id, _ = a.take()
    assert lost and (number, trial_id) == (0, a.trials[0]._trial_id)
    running = [t for t in a.study.get_trials() if t.state == TrialState.RUNNING]
    assert [t._trial_id for t in running] == [trial_id]  # this one, and no other
    assert running[0].system_attrs[OWNER] == dataclasses.asdict(a.me)


def test_a_tell_whose_answer_the_connection_lost_is_told_once(tmp_path, monkeypatch):
    """The study is told a trial's end, the commit lands, the answer does not: the retry finds the trial ended
    as told, where Optuna alone would refuse to update a finished trial and stop the worker."""
    (a,) = _workers(tmp_path, n=1)
    _, trial_id, _ = a.take()
    lost = _lose_the_first_written_answer(monkeypatch, optuna.storages._rdb.storage, a.storage)
    a.study.tell(optuna.Trial(a.study, trial_id), 0.5)
    assert lost
    told = a.storage.get_trial(trial_id)
    assert (told.state, told.value) == (TrialState.COMPLETE, 0.5)


def test_a_stale_snapshot_never_hands_back_a_trial_another_worker_took_over(tmp_path):
    """Worker c saw trial X running for a gone worker; b took X over and claimed it since. c's takeover, from its
    old snapshot, must leave X with b: handing it back would let a third worker run it beside b."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    b, c = (StudyStore(SPEC, url, "s", seed, "none", stale_after_s=0.01) for seed in range(2))
    _, x, _ = b.take()
    gone = {"host": "a-preempted-vm", "pid": 1, "started": None}
    b.storage.set_trial_system_attr(x, OWNER, gone)  # X's worker was on another host, now silent
    time.sleep(0.05)
    c.snapshot()
    b.snapshot()
    assert b.take_over() and b.take()[1] == x  # b resumes X
    c.take_over()  # c still sees X as the gone worker's
    assert b.storage.get_trial(x).state == TrialState.RUNNING
    assert b.storage.get_trial(x).system_attrs[OWNER] == dataclasses.asdict(b.me)


def test_a_resumed_trial_is_measured_on_every_epoch_its_workers_reported(tmp_path):
    """A worker reported a trial's last epoch, then stopped before telling the study; the next one resumes it
    from an earlier checkpoint and repeats that epoch, which does not count again: the trial is still measured
    on the whole curve, not on what the second worker added (nothing)."""
    a, b = _workers(tmp_path)
    _, trial_id, _ = a.take()
    a.snapshot()
    for epoch, value in ((1, 0.5), (2, 0.7)):
        a.record(trial_id, epoch, value)
    a.report([(trial_id, 1, 0.5), (trial_id, 2, 0.7)])
    a.release(trial_id)
    b.snapshot()
    _, taken, resumed = b.take()
    assert (taken, resumed) == (trial_id, True)
    assert not b.record(trial_id, 2, 0.6)  # epoch 2 again, from the checkpoint of epoch 1
    assert b.measurements(trial_id) == {1: 0.5, 2: 0.7}


def test_reports_land_in_one_transaction_and_a_repeated_epoch_keeps_the_first(tmp_path):
    a, b = _workers(tmp_path)
    _, trial_id, _ = a.take()
    a.snapshot()
    assert a.record(trial_id, 1, 0.5) and a.record(trial_id, 2, 0.6)
    assert not a.record(trial_id, 2, 0.9)  # a resumed trial repeats epoch 2: the first value counts
    a.report([(trial_id, 1, 0.5), (trial_id, 2, 0.6)], [(trial_id, "mnist_jax:note", "x")])
    seen = {t._trial_id: t for t in b.snapshot()}[trial_id]
    assert seen.intermediate_values == {1: 0.5, 2: 0.6} and seen.system_attrs["mnist_jax:note"] == "x"


def test_the_snapshot_shows_this_workers_measurements_before_they_are_stored(tmp_path):
    (a,) = _workers(tmp_path, n=1)
    _, trial_id, _ = a.take()
    a.record(trial_id, 1, 0.25)
    assert {t._trial_id: t for t in a.snapshot()}[trial_id].intermediate_values == {1: 0.25}


@pytest.mark.parametrize("rule, stops", [("halving", True), ("median", False)])
def test_stopping_from_one_snapshot_through_optunas_pruners(tmp_path, rule, stops):
    """Six trials that run together: successive halving stops the worst at epoch 1; median stopping, which
    compares with completed trials only, stops none."""
    (a,) = _workers(tmp_path, stopping=rule, n=1)
    ids = [a.take()[1] for _ in range(SPEC.max_trials)]
    view = View(a.snapshot(), a.study.direction)
    decisions = []
    for i, trial_id in enumerate(ids):
        a.record(trial_id, 1, 0.1 * (len(ids) - i))  # each worse than the ones before it
        decisions.append(a.should_stop(view, trial_id))
    assert any(decisions) is stops
    if rule == "halving":
        assert not decisions[0] and decisions[-1]  # the best so far goes on, the worst stops
        assert {key for _, key, _ in view.writes} == {"completed_rung_0"}  # rungs, to store with the reports
    assert all(not t.intermediate_values for t in a.study.get_trials())  # nothing was written


def test_the_record_is_a_pure_function_of_the_trials():
    trials = [
        optuna.trial.create_trial(
            state=state,
            value=value,
            intermediate_values={1: 0.5, 2: value if value is not None else 0.4},
            user_attrs={"params": {"x": i}},
            system_attrs={},
        )
        for i, (state, value) in enumerate(
            [(optuna.trial.TrialState.COMPLETE, 0.9), (optuna.trial.TrialState.PRUNED, None)]
        )
    ]
    for i, t in enumerate(trials):
        t.number = i
    spec = study.Study("MAXIMIZE", "accuracy", (), 3, 1, 2)
    summary = study_record.summary(spec, trials, {"name": "s"})
    assert summary["status"] == "SUCCEEDED" and summary["best"]["id"] == 1
    assert [t["status"] for t in summary["trials"]] == ["SUCCEEDED", "STOPPED"]
    assert summary["trials"][1]["metric"] == 0.4  # LAST_MEASUREMENT
    line = study_record.progress_line(summary, None)
    assert line.startswith("study: 2/3 done (1 succeeded, 1 stopped, 0 failed), 0 running; best trial 1")
    assert study_record.epochs_left(summary, 2) == 2
