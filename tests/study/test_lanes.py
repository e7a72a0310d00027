"""The one training loop with K lanes: each lane's math equals its trial alone, refills without compiling,
stops, device-count invariance, SIGTERM and SIGKILL to a group of lanes, and successive halving."""

from __future__ import annotations

import collections
import json
import re
import signal
import subprocess
from pathlib import Path

import jax
import pytest

from mnist_jax.training import loop
from mnist_jax.training.config import parse_args
from mnist_jax.training.source import Outcome, TrialSource

from helpers import (
    assert_states_equal,
    load_final_state,
    max_difference,
    once,
    read_metrics,
    run_here,
    run_process,
    tiny_args,
    wait_for,
    write_study,
)

# Every program is lowered before it is compiled or found in the disk cache.
LOWERING = "/jax/core/compile/jaxpr_to_mlir_module_duration"


class Recorder(TrialSource):
    """A trial source that hands out fixed trials, records what the loop says, and stops on request (the rest of
    the loop's questions answered by TrialSource's defaults)."""

    def __init__(self, configs, stop_after=None, on_done=None):
        self.pending = list(configs)
        self.stop_after = stop_after or {}
        self.records = collections.defaultdict(list)
        self.outcomes = {}
        self.lines = collections.defaultdict(list)
        self.on_done = on_done

    def next_trial(self):
        return self.pending.pop(0) if self.pending else None

    def decide(self, ended):
        return [self.stop_after.get(config.trial_id) == record["epoch"] for config, record in ended]

    def report(self, ended):
        for config, record in ended:
            self.records[config.trial_id].append(record)

    def trial_done(self, config, outcome):
        self.outcomes[config.trial_id] = outcome
        if self.on_done is not None:
            self.on_done()

    def say(self, config, message):
        self.lines[config.trial_id].append(message)


TRIALS = [  # (epochs, flags): different epochs, so lanes refill at different times
    (1, ["--dropout-one=0.1", "--dropout-two=0.4", "--learning-rate=0.001"]),
    (3, ["--dropout-one=0.35", "--dropout-two=0.0", "--learning-rate=0.003"]),
    (2, ["--seed=7", "--learning-rate=0.0005"]),
    (1, ["--seed=3"]),
    (2, ["--dropout-one=0.25", "--seed=11"]),
]


def _configs(tmp_path, train_file, name, trials=TRIALS):
    return [
        parse_args(
            [*tiny_args(train_file, epochs), "--job-dir", str(tmp_path / f"{name}-{i}"), *flags],
            {"CLOUD_ML_TRIAL_ID": str(i), "CLOUD_ML_HP_METRIC_FILE": str(tmp_path / f"{name}-{i}" / "hpt")},
        )
        for i, (epochs, flags) in enumerate(trials)
    ]


def test_lanes_refill_without_compiling_and_each_trial_equals_its_solo_run(tiny_pickle, tmp_path):
    lowered, after_first_trial = [], []

    def count(event, duration, **kwargs):
        if event == LOWERING:
            lowered.append(event)

    jax.clear_caches()  # the programs an earlier run in this process kept are lowered again
    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        configs = _configs(tmp_path, tiny_pickle, "lane")
        source = Recorder(configs, on_done=lambda: after_first_trial.append(len(lowered)))
        loop.train_lanes(configs[0], source, lanes=2)
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    # Every program was lowered by the time the first trial left its lane; four trials came after.
    assert len(lowered) == after_first_trial[0] > 0
    assert {k: o.status for k, o in source.outcomes.items()} == {str(i): "SUCCEEDED" for i in range(len(TRIALS))}
    assert {k: [r["epoch"] for r in records] for k, records in source.records.items()} == {
        str(i): list(range(1, epochs + 1)) for i, (epochs, _) in enumerate(TRIALS)
    }
    # The same trials one after another in one lane: the solo job's program (a lane of one is the solo job).
    solos = _configs(tmp_path, tiny_pickle, "solo")
    loop.train_lanes(solos[0], Recorder(solos), lanes=1)
    for config, solo in zip(configs, solos):
        lane, alone = load_final_state(config.job_dir), load_final_state(solo.job_dir)
        assert int(lane.step) == int(alone.step) == 4 * config.epochs
        assert max_difference(lane, alone) < 1e-5, config.trial_id
        job_dir = tmp_path / f"lane-{config.trial_id}"
        assert (job_dir / "model.h5").is_file() and (job_dir / "curves.png").is_file()
        assert json.loads((job_dir / "config.json").read_text())["trial_id"] == config.trial_id
        for a, b in zip(read_metrics(job_dir), read_metrics(solo.job_dir), strict=True):
            assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["val_loss"] - b["val_loss"]) < 1e-5
        # A lane's metric goes to its source (a study's storage) alone; the solo job's to its tuning file.
        assert not (job_dir / "hpt").exists()
        hpt = [json.loads(line) for line in (tmp_path / f"solo-{config.trial_id}" / "hpt").read_text().splitlines()]
        assert [h["trial"] for h in hpt] == [config.trial_id] * config.epochs
        assert source.lines[config.trial_id][-1] == f"Saved {job_dir}/model.h5"


def test_a_stopped_trial_is_saved_and_frees_its_lane(tiny_pickle, tmp_path):
    configs = _configs(tmp_path, tiny_pickle, "stop", trials=[(3, []), (2, ["--seed=1"]), (1, ["--seed=2"])])
    source = Recorder(configs, stop_after={"0": 1})
    loop.train_lanes(configs[0], source, lanes=2)
    assert source.outcomes["0"] == Outcome("STOPPED", 1)
    assert [o.status for o in source.outcomes.values()] == ["STOPPED", "SUCCEEDED", "SUCCEEDED"]
    stopped = tmp_path / "stop-0"
    assert int(load_final_state(stopped).epoch) == 1 and not (stopped / "model.h5").exists()
    # The stopped trial's lane went to trial 2, which started after it and ended with trial 1.
    assert [r["epoch"] for r in source.records["2"]] == [1]


def _grid(path, values):
    parameters = [
        {"parameterId": "learning-rate", "discreteValueSpec": {"values": values}},
        {"parameterId": "dropout-one", "discreteValueSpec": {"values": [0.1, 0.3]}},
    ]
    return write_study(path, parameters, algorithm="GRID_SEARCH", maxTrialCount=2 * len(values), parallelTrialCount=1)


def _tune(args):
    """`tune run ARGS` in this process: its lanes train here."""
    return run_here("tune", ["run", *args])


def test_lanes_on_four_devices_match_one_device(tiny_pickle, tmp_path):
    study = _grid(tmp_path / "grid.yaml", [0.001])  # two trials: one group of 2 lanes
    for devices in (1, 4):
        args = ["run", "--config", study, "--job-dir", str(tmp_path / f"d{devices}"), "--vectorize", "2", "--"]
        args += tiny_args(tiny_pickle, 1)
        result = run_here("tune", args) if devices == 1 else run_process("tune", args, devices=devices)
        assert result.returncode == 0, result.stderr
        assert f"Training on {devices} cpu device(s), 1 process(es), 2 lanes" in result.stdout
    one = json.loads((tmp_path / "d1/study.json").read_text())["trials"]
    four = json.loads((tmp_path / "d4/study.json").read_text())["trials"]
    assert [t["params"] for t in one] == [t["params"] for t in four]
    for t in one:
        a, b = load_final_state(tmp_path / f"d1/trial-{t['id']}"), load_final_state(tmp_path / f"d4/trial-{t['id']}")
        assert max_difference(a.params, b.params) < 1e-5
        m1, m4 = (read_metrics(tmp_path / f"d{n}/trial-{t['id']}") for n in (1, 4))
        assert abs(m1[0]["loss"] - m4[0]["loss"]) < 1e-5 and abs(m1[0]["val_loss"] - m4[0]["val_loss"]) < 1e-5


def _lane_study(train_file, study: str, job_dir: Path, every: str) -> list[str]:
    """`tune run` flags of the lane signal tests' study: 4 trials, two at a time in 2 lanes, 5 epochs each."""
    trainer = [*tiny_args(train_file, 5), "--seed", "5", "--checkpoint-every", every]
    return ["--config", study, "--job-dir", str(job_dir), "--vectorize", "2", "--", *trainer]


@pytest.fixture(scope="session")
def whole_study(slow_data, tmp_path_factory, worker_id) -> Path:
    """The lane signal tests' reference: their 4-trial grid study run whole in this process (`whole`), with its
    study config (`grid.yaml`); made once for the run. Checkpoint cadence changes no result, so one serves both."""

    def run(root: Path) -> None:
        result = _tune(_lane_study(slow_data, _grid(root / "grid.yaml", [0.001, 0.002]), root / "whole", "1"))
        assert result.returncode == 0, result.stderr

    return once(tmp_path_factory, worker_id, "lane-study", run)


def _start_cut(slow_data, whole_study: Path, tmp_path: Path, every: str) -> tuple[subprocess.Popen, list[str]]:
    """The reference study started in a process of its own (job dir `cut`) for the test to interrupt; returns that
    process and the `tune run` flags that resume it."""
    args = _lane_study(slow_data, str(whole_study / "grid.yaml"), tmp_path / "cut", every)
    return run_process("tune", ["run", *args], wait=False), args


def _assert_cut_resumed_as_whole(whole_study: Path, tmp_path: Path) -> list[dict]:
    """The interrupted and resumed study measured and saved what the whole one did; returns its trials."""
    whole = json.loads((whole_study / "whole/study.json").read_text())
    resumed = json.loads((tmp_path / "cut/study.json").read_text())
    assert sorted(t["id"] for t in resumed["trials"]) == [1, 2, 3, 4]  # the first two resumed, then two more
    assert [t["measurements"] for t in whole["trials"]] == [t["measurements"] for t in resumed["trials"]]
    for t in whole["trials"]:
        assert t["status"] == "SUCCEEDED"
        cut, reference = tmp_path / f"cut/trial-{t['id']}", whole_study / f"whole/trial-{t['id']}"
        assert_states_equal(load_final_state(cut), load_final_state(reference))
    return whole["trials"]


@pytest.mark.slow
def test_sigterm_to_a_group_saves_every_lane_and_the_rerun_resumes_them(slow_data, whole_study, tmp_path):
    process, cut = _start_cut(slow_data, whole_study, tmp_path, every="3")
    first_log = tmp_path / "cut/trial-1/train.log"  # a lane's epoch lines come as it trains
    wait_for(lambda: first_log.exists() and "Epoch 1/" in first_log.read_text(), process)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert "preempted: SIGTERM: saved 2 lanes" in stderr and "Traceback" not in stderr
    handed_back = json.loads((tmp_path / "cut/study.json").read_text())
    assert {t["status"] for t in handed_back["trials"]} == {"REQUESTED"}  # handed back to the study, to resume
    # Every lane saved the epoch in flight, although checkpoints were due only every 3 epochs.
    for t in handed_back["trials"]:
        state = load_final_state(tmp_path / f"cut/trial-{t['id']}")
        assert int(state.epoch) == len(t["measurements"]) > 0
    again = _tune(cut)
    assert again.returncode == 0, again.stderr
    assert "trial 1: resuming" in again.stdout and "trial 2: resuming" in again.stdout
    _assert_cut_resumed_as_whole(whole_study, tmp_path)


@pytest.mark.slow
def test_sigkill_mid_study_resumes_every_lane_from_its_group_bit_identical(slow_data, whole_study, tmp_path):
    process, cut = _start_cut(slow_data, whole_study, tmp_path, every="1")
    groups = tmp_path / "cut" / "lanes"
    wait_for(lambda: groups.is_dir() and any((g / "2").is_dir() for g in groups.iterdir()), process)  # save 2 is in
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL
    assert not list((tmp_path / "cut").glob("trial-*/checkpoints/*"))  # no trial has left its lane: no own save
    again = _tune(cut)
    assert again.returncode == 0, again.stderr
    for n in (1, 2):
        assert f"trial {n}: resuming" in again.stdout
        resumed_at = re.findall(r"Resuming from epoch (\d+)", (tmp_path / f"cut/trial-{n}/train.log").read_text())
        assert len(resumed_at) == 1 and int(resumed_at[0]) >= 2  # from the group's copy of its lane
    for t in _assert_cut_resumed_as_whole(whole_study, tmp_path):
        assert [r["epoch"] for r in read_metrics(tmp_path / f"cut/trial-{t['id']}")] == [1, 2, 3, 4, 5]
    assert not groups.exists()  # every trial has its own checkpoint now
    # A trial's job dir is a job's: export its checkpoint, or train it on.
    trial = tmp_path / "cut/trial-1"
    exported = run_here("export", ["--checkpoint", str(trial / "checkpoints"), "--out", str(tmp_path / "t1.h5")])
    assert exported.returncode == 0, exported.stderr
    more = run_here("train", ["--config", str(trial / "config.json"), "--epochs", "6"])
    assert more.returncode == 0 and "Resuming from epoch 5 " in more.stdout, more.stderr


def test_successive_halving_stops_trials_that_run_together(learnable_pickle, tmp_path):
    # As many lanes as trials: median stopping, which compares with completed trials, could stop none.
    rates = [2e-3, 1e-5, 1.5e-3, 2e-5]
    parameters = [{"parameterId": "learning-rate", "discreteValueSpec": {"values": rates}}]
    config = write_study(tmp_path / "halving.yaml", parameters, algorithm="GRID_SEARCH", maxTrialCount=4)
    job_dir = tmp_path / "study"
    result = _tune(
        ["--config", config, "--job-dir", str(job_dir), "--vectorize", "4", "--stopping", "halving", "--"]
        + tiny_args(learnable_pickle, 4)
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((job_dir / "study.json").read_text())
    assert summary["early_stopping"] == "halving" and "SuccessiveHalvingPruner" in summary["stopping_rule"]
    stopped = [t for t in summary["trials"] if t["status"] == "STOPPED"]
    assert stopped and all(len(t["measurements"]) < 4 for t in stopped)
    assert sum(len(t["measurements"]) for t in summary["trials"]) < 4 * 4
    best = summary["best"]["params"]["learning-rate"]
    assert best >= 1e-3 and best not in [t["params"]["learning-rate"] for t in stopped]
