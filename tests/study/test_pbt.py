"""Population-based training in lanes: exploit and explore, the copy in one compiled program, the records, every
member's recipe replayed alone, refusals, and SIGKILL mid-study resumed bit-identical."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import jax
import numpy as np
import pytest

from mnist_jax.model.keras_h5 import read_model
from mnist_jax.study import pbt, population
from mnist_jax.study.population import Exploit
from mnist_jax.study.spec import Parameter, Study

from helpers import assert_refused, once, read_metrics, run_here, run_process, tiny_args, wait_for, write_study

LOWERING = "/jax/core/compile/jaxpr_to_mlir_module_duration"
PARAMETERS = [
    {"parameterId": "dropout-one", "doubleValueSpec": {"minValue": 0.1, "maxValue": 0.5}},
    {"parameterId": "dropout-two", "discreteValueSpec": {"values": [0.0, 0.1, 0.2, 0.3]}},
    {
        "parameterId": "learning-rate",
        "doubleValueSpec": {"minValue": 1e-4, "maxValue": 1e-2},
        "scaleType": "UNIT_LOG_SCALE",
    },
]
SPEC = Study(
    goal="MAXIMIZE",
    metric="accuracy",
    parameters=(
        Parameter("dropout-one", "DOUBLE", 0.1, 0.5, scale="UNIT_REVERSE_LOG_SCALE"),
        Parameter("dropout-two", "DISCRETE", values=(0.0, 0.1, 0.2, 0.3)),
        Parameter("learning-rate", "DOUBLE", 1e-4, 1e-2, scale="UNIT_LOG_SCALE"),
    ),
    max_trials=8,
    parallel_trials=1,
    max_failed_trials=8,
)


def test_explore_nudges_each_parameter_in_its_scale_or_draws_it_afresh_and_stays_in_bounds():
    rng = np.random.default_rng(0)
    donor = {"dropout_one": 0.45, "dropout_two": 0.1, "learning_rate": 1e-3}
    draws = [population.explore(SPEC, donor, rng) for _ in range(2000)]
    for name, p in (("dropout_one", SPEC.parameters[0]), ("learning_rate", SPEC.parameters[2])):
        values = np.array([d[name] for d in draws])
        assert values.min() >= p.min_value and values.max() <= p.max_value
        nudged = {round(v, 12) for v in values} & {
            round(min(max(x, p.min_value), p.max_value), 12) for x in _nudges(p, donor[name])
        }
        assert len(nudged) == 2  # both factors seen
    rates = np.array([d["learning_rate"] for d in draws])
    nudged_share = np.isclose(rates, 8e-4).mean() + np.isclose(rates, 1.2e-3).mean()
    assert 0.7 < nudged_share < 0.8  # a quarter are drawn afresh
    assert {d["dropout_two"] for d in draws} == {0.0, 0.1, 0.2, 0.3}  # neighbours 0.0 and 0.2, and fresh draws
    moved = [d["dropout_two"] for d in draws if d["dropout_two"] in (0.0, 0.2)]
    assert len(moved) > 1400


def _nudges(p: Parameter, value: float) -> list[float]:
    if p.scale == "UNIT_REVERSE_LOG_SCALE":  # the factor applies to the mirror a + b - x
        return [p.min_value + p.max_value - (p.min_value + p.max_value - value) * f for f in population.FACTORS]
    return [value * f for f in population.FACTORS]


def test_the_bottom_quantile_copies_the_top_and_the_draws_depend_on_the_seed_and_epoch_alone():
    metrics = {member: 0.1 * member for member in range(1, 9)}  # member 8 is the best
    current = {member: {"dropout_one": 0.2, "dropout_two": 0.1, "learning_rate": 1e-3} for member in metrics}
    first = population.exploits(SPEC, 4, metrics, current, seed=3, quantile=0.25)
    assert [e.member for e in first] == [1, 2] and {e.donor for e in first} <= {7, 8}
    assert first == population.exploits(SPEC, 4, metrics, current, seed=3, quantile=0.25)
    assert first != population.exploits(SPEC, 6, metrics, current, seed=3, quantile=0.25)
    assert [population.quantile_size(n, 0.25) for n in (2, 3, 4, 8, 9)] == [1, 1, 1, 2, 3]
    assert population.quantile_size(5, 0.5) == 2  # never more than half


def test_a_schedule_follows_the_state_back_through_its_donors():
    initial = {m: {"learning_rate": m / 1000, "dropout_one": 0.2, "dropout_two": 0.2} for m in (1, 2, 3)}
    seeds = {1: 10, 2: 11, 3: 12}
    after = {"learning_rate": 0.5, "dropout_one": 0.3, "dropout_two": 0.2}
    history = [
        Exploit(2, member=3, donor=1, before=initial[3], after=after, member_metric=0.1, donor_metric=0.9),
        Exploit(4, member=2, donor=3, before=initial[2], after=initial[1], member_metric=0.1, donor_metric=0.9),
    ]
    spans = population.schedule(2, 6, initial, seeds, history)
    assert [(s["first_epoch"], s["last_epoch"], s["member"], s["seed"]) for s in spans] == [
        (1, 2, 1, 10),  # member 1 from scratch, member 3 took its state after epoch 2
        (3, 4, 3, 12),  # trained on with member 3's stream and settings
        (5, 6, 2, 11),  # member 2 took that after epoch 4
    ]
    assert spans[1]["learning_rate"] == 0.5 and spans[2]["learning_rate"] == 0.001
    assert population.settings_at(3, 2, initial[3], history) == after
    assert population.settings_at(3, 1, initial[3], history) == initial[3]


def _pbt_args(train_file, study: str, job_dir: Path, epochs: int, every: int, *trainer) -> list[str]:
    return [
        "run", "--config", study, "--job-dir", str(job_dir), "--vectorize", "4", "--pbt",
        "--perturb-every", str(every), "--seed", "2", "--", *tiny_args(train_file, epochs), *trainer,
    ]  # fmt: skip


def _study(path: Path, members: int = 4) -> str:
    return write_study(path, PARAMETERS, algorithm="RANDOM_SEARCH", maxTrialCount=members)


def test_a_population_copies_on_the_device_without_compiling_and_every_member_replays_alone(
    tiny_pickle, tmp_path, monkeypatch
):
    lowered, at_perturbation = [], []

    def count(event, duration, **kwargs):
        if event == LOWERING:
            lowered.append(event)

    decide = pbt.PopulationSource.perturb

    def perturb(self, ended):
        at_perturbation.append(len(lowered))
        return decide(self, ended)

    monkeypatch.setattr(pbt.PopulationSource, "perturb", perturb)
    jax.clear_caches()  # programs an earlier run in this process kept are lowered again
    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        result = run_here("tune", _pbt_args(tiny_pickle, _study(tmp_path / "s.yaml"), tmp_path / "pbt", 5, 1))
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    assert result.returncode == 0, result.stderr
    # The first perturbation lowered one program, the copy's; the three after it, and the epochs between, nothing
    # (finishing the members lowers what any study's end does).
    assert len(at_perturbation) == 5 and at_perturbation[1] - at_perturbation[0] == 1
    assert at_perturbation[1] == at_perturbation[-1]
    root = tmp_path / "pbt"
    history = [json.loads(line) for line in (root / "pbt.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in history] == [1, 2, 3, 4]  # one exploit an epoch (4 members, quantile 0.25)
    for e in history:
        assert set(e) == {"epoch", "member", "donor", "before", "after", "member_metric", "donor_metric"}
        assert e["donor_metric"] >= e["member_metric"] and e["member"] != e["donor"]
        rows = read_metrics(root / f"trial-{e['member']}")
        before, after = rows[e["epoch"] - 1], rows[e["epoch"]]
        assert after["parent"] == e["donor"]
        exploited_before = any(x["member"] == e["member"] and x["epoch"] == e["epoch"] - 1 for x in history)
        assert ("parent" in before) is exploited_before
        assert {k: before[k] for k in e["before"]} == e["before"] and {k: after[k] for k in e["after"]} == e["after"]
    summary = json.loads((root / "study.json").read_text())
    assert summary["best"] is not None and "population-based training" in summary["search"]
    assert all(len(t["measurements"]) == 5 and t["status"] == "SUCCEEDED" for t in summary["trials"])
    assert (root / "pbt.png").stat().st_size > 0
    for member in sorted({e["member"] for e in history} | {summary["best"]["id"]}):
        _assert_replays(tiny_pickle, root / f"trial-{member}", tmp_path / f"replay-{member}")


def _assert_replays(train_file, member: Path, replay: Path) -> None:
    """`train --schedule` trains the member's model alone: every weight within 1e-5, the validation accuracy of
    each epoch within 1e-4 of the lane that trained it."""
    result = run_here("train", ["--schedule", str(member / "schedule.json"), "--train-file", str(train_file),
                                "--job-dir", str(replay)])  # fmt: skip
    assert result.returncode == 0, result.stderr
    (ours, rates), (theirs, replayed_rates) = read_model(str(member / "model.h5")), read_model(str(replay / "model.h5"))
    assert rates == replayed_rates
    for layer in ours:
        for name in ours[layer]:
            assert np.max(np.abs(ours[layer][name] - theirs[layer][name])) < 1e-5, (member, layer, name)
    recipe = json.loads((member / "schedule.json").read_text())
    lanes = {}
    for span in recipe["spans"]:
        for row in read_metrics(member.parent / f"trial-{span['member']}"):
            if span["first_epoch"] <= row["epoch"] <= span["last_epoch"]:
                lanes[row["epoch"]] = row["val_accuracy"]
    alone = read_metrics(replay)
    assert [row["epoch"] for row in alone] == sorted(lanes) == list(range(1, recipe["epochs"] + 1))
    assert all(abs(row["val_accuracy"] - lanes[row["epoch"]]) < 1e-4 for row in alone)


@pytest.mark.parametrize(
    "change, message",
    [
        (["--stopping", "halving"], "--pbt replaces weak members instead of stopping them: --stopping halving"),
        (["--vectorize", "2"], "--vectorize 2 is less than its 4 members; use --vectorize 4"),
        (
            ["--hidden"],
            "--pbt perturbs learning-rate, dropout-one, dropout-two while members train; the study "
            "also tunes hidden-units",
        ),  # fmt: skip
    ],
)
def test_a_population_that_cannot_work_is_refused_in_one_line(change, message, tiny_pickle, tmp_path):
    parameters = PARAMETERS
    if change == ["--hidden"]:
        parameters, change = [*PARAMETERS, {"parameterId": "hidden-units", "integerValueSpec": {
            "minValue": 8, "maxValue": 16}}], []  # fmt: skip
    study = write_study(tmp_path / "s.yaml", parameters, algorithm="RANDOM_SEARCH", maxTrialCount=4)
    args = _pbt_args(tiny_pickle, study, tmp_path / "pbt", 2, 1)
    cut = args.index("--")  # the change after the study's flags, where it wins
    assert_refused(run_here("tune", args[:cut] + change + args[cut:]), message)
    assert not (tmp_path / "pbt" / "trial-1").exists()


@pytest.fixture(scope="session")
def whole_population(slow_data, tmp_path_factory, worker_id) -> Path:
    """The kill test's reference: a 4-member population of 6 epochs, perturbed every 2, run whole in this
    process (`whole`), with its study config; made once for the run."""

    def run(root: Path) -> None:
        args = _pbt_args(slow_data, _study(root / "s.yaml"), root / "whole", 6, 2, "--checkpoint-every", "1")
        result = run_here("tune", args)
        assert result.returncode == 0, result.stderr

    return once(tmp_path_factory, worker_id, "population", run)


@pytest.mark.slow
def test_sigkill_mid_population_resumes_bit_identical_and_a_second_driver_is_refused(
    slow_data, whole_population, tmp_path
):
    args = _pbt_args(slow_data, str(whole_population / "s.yaml"), tmp_path / "cut", 6, 2, "--checkpoint-every", "1")
    process = run_process("tune", args, wait=False)
    groups = tmp_path / "cut" / "lanes"
    wait_for(lambda: groups.is_dir() and any((g / "3").is_dir() for g in groups.iterdir()), process)  # epoch 3 saved
    second = run_here("tune", args)  # the same study while its driver runs
    assert_refused(second, "is population-based training, and worker")
    assert "a PBT study runs under one driver" in second.stderr
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL
    again = run_here("tune", args)
    assert again.returncode == 0, again.stderr
    assert all(f"trial {n}: resuming" in again.stdout for n in range(1, 5))
    whole, cut = whole_population / "whole", tmp_path / "cut"
    assert (cut / "pbt.jsonl").read_text() == (whole / "pbt.jsonl").read_text() != ""
    for n in range(1, 5):
        (a, rates_a), (b, rates_b) = (
            read_model(str(whole / f"trial-{n}/model.h5")),
            read_model(str(cut / f"trial-{n}/model.h5")),
        )
        assert rates_a == rates_b
        for layer in a:
            for name in a[layer]:
                np.testing.assert_array_equal(a[layer][name], b[layer][name])
        assert (whole / f"trial-{n}/schedule.json").read_text() == (cut / f"trial-{n}/schedule.json").read_text()
