"""A new user's mistakes, caught before anything trains and said in one line: study config typos, parameters
that are no trainer flag, a metric the trainer does not report, too few epochs for a job dir, a misspelt
flag; Ctrl-C stops as SIGTERM does; --help and flag errors answer without importing JAX."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import yaml

from mnist_jax.common.errors import ConfigError
from mnist_jax.study import spec as study
from mnist_jax.training.config import parse_args

from helpers import REPO, job_args, run_here, run_process, tiny_args, wait_for

DROPOUT = {"parameterName": "dropout-one", "type": "DOUBLE", "minValue": 0.1, "maxValue": 0.5}
VERTEX_DROPOUT = {"parameterId": "dropout-one", "doubleValueSpec": {"minValue": 0.1, "maxValue": 0.5}}


def _legacy(**hyperparameters):
    return {"trainingInput": {"hyperparameters": {"params": [DROPOUT], **hyperparameters}}}


def _vertex(spec=None, **counts):
    return {"studySpec": {"metrics": [{"metricId": "accuracy", "goal": "MAXIMIZE"}], "parameters": [VERTEX_DROPOUT],
                          **(spec or {})}, **counts}  # fmt: skip


@pytest.mark.parametrize(
    "document, message",
    [
        (_legacy(maxTrails=4), "unknown key trainingInput.hyperparameters.maxTrails (did you mean maxTrials?)"),
        (_legacy(maxParalelTrials=2), "hyperparameters.maxParalelTrials (did you mean maxParallelTrials?)"),
        (
            _legacy(enableTrialEarlyStoping=True),
            "hyperparameters.enableTrialEarlyStoping (did you mean enableTrialEarlyStopping?)",
        ),
        (
            {"trainingInput": {"hyperparameters": {"params": [{**DROPOUT, "scaletype": "UNIT_LOG_SCALE"}]}}},
            "unknown key trainingInput.hyperparameters.params[1].scaletype (did you mean scaleType?)",
        ),
        (_vertex(maxTrialCont=4), "unknown key maxTrialCont (did you mean maxTrialCount?)"),
        (_vertex({"algoritm": "GRID_SEARCH"}), "unknown key studySpec.algoritm (did you mean algorithm?)"),
        (
            _vertex({"parameters": [{"parameterId": "x", "doubleValueSpec": {"minValue": 0.1, "maxVal": 1}}]}),
            "studySpec.parameters[1].doubleValueSpec.maxVal (did you mean maxValue?)",
        ),
        (
            {"trainingInput": {"hyperparameters": {"params": [{"type": "DOUBLE"}]}}},
            "trainingInput.hyperparameters.params[1] has no parameterName",
        ),
        (_vertex({"metrics": [{"goal": "MAXIMIZE"}]}), "studySpec.metrics[1] has no metricId"),
        ({"trainingInput": {"scaleTier": "BASIC"}}, "not a Vertex study config (no studySpec) nor a legacy one"),
    ],
)
def test_study_config_mistakes_are_named_in_words(document, message, tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(ConfigError) as error:
        study.load_study(str(path))
    assert message in str(error.value) and "Error(" not in str(error.value)


def test_the_shipped_configs_pass_the_key_check():
    for name in ("hptuning_config.yaml", "vertex_hpt.yaml"):
        study.load_study(str(REPO / "configs" / name))


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"params": [{**DROPOUT, "parameterName": "dropout-too"}]},
            "parameter dropout-too is not a trainer flag (did you mean dropout-two?)",
        ),
        (
            {"hyperparameterMetricTag": "acuracy"},
            "the study's metric is 'acuracy', but the trainer reports its validation accuracy as 'accuracy'; "
            "use that metric id, or pass --hpt-metric-tag acuracy after --",
        ),
    ],
)
@pytest.mark.parametrize("mode", [[], ["--vectorize", "2"]])
def test_a_study_that_cannot_work_stops_before_any_trial(change, message, mode, tiny_pickle, tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"trainingInput": {"hyperparameters": {"params": [DROPOUT], **change}}}))
    job_dir = tmp_path / "study"
    result = run_here("tune", ["run", "--config", str(path), "--job-dir", str(job_dir), *mode, "--"]
                        + tiny_args(tiny_pickle))  # fmt: skip
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line == f"error: {path}: {message}"
    assert not job_dir.exists() or not list(job_dir.glob("trial-*"))  # nothing trained, no data loaded


def test_fewer_epochs_than_the_job_dir_holds_is_an_error_that_changes_nothing(tiny_pickle, tmp_path):
    args = [*tiny_args(tiny_pickle, epochs=2), "--job-dir", str(tmp_path / "job")]
    run_here("train", args, check=True)
    before = {p: p.read_bytes() for p in (tmp_path / "job").rglob("*") if p.is_file()}
    result = run_here("train", [*args, "--epochs", "1"])
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: {tmp_path / 'job'} holds a job trained for 2 epochs, more than --epochs 1; "
        "use a new --job-dir, or --epochs 2 or more"
    )
    after = {p: p.read_bytes() for p in (tmp_path / "job").rglob("*") if p.is_file()}
    assert after == before  # no config.json, model.h5 or TensorBoard run rewritten
    again = run_here("train", args, check=True)  # the same epochs: nothing to train, the model re-exported
    assert "Resuming from epoch 2" in again.stdout and "Epoch 1/" not in again.stdout


def test_ctrl_c_saves_the_epoch_in_flight_and_exits_130_in_one_line(slow_data, tmp_path):
    job_dir = tmp_path / "job"
    process = run_process("train", job_args(slow_data, job_dir), wait=False)
    wait_for(lambda: (job_dir / "metrics.jsonl").exists(), process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    (line,) = stderr.strip().splitlines()
    assert line.startswith("warning: interrupted: Ctrl-C: saved epoch ") and "rerun the same command" in line
    saved = int(line.split("saved epoch ")[1].split()[0])
    result = run_here("train", job_args(slow_data, job_dir, epochs=saved + 1), check=True)
    assert f"Resuming from epoch {saved} " in result.stdout


def test_ctrl_c_to_a_study_stops_its_trial_processes_without_a_traceback(slow_data, tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(_legacy(maxTrials=2)))
    process = run_process(
        "tune",
        ["run", "--config", str(path), "--job-dir", str(tmp_path / "s"), "--", *tiny_args(slow_data, 20)],
        wait=False,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    log = tmp_path / "s" / "trial-1" / "train.log"
    wait_for(lambda: log.exists() and "Epoch 1/" in log.read_text(), process)
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the driver and its trials
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1].startswith("warning: interrupted: Ctrl-C: every running trial saved")
    assert "Traceback" not in stderr and "Traceback" not in log.read_text()
    assert "interrupted: Ctrl-C: saved epoch" in log.read_text()
    summary = json.loads((tmp_path / "s" / "study.json").read_text())
    assert summary["trials"][0]["status"] == "REQUESTED"  # handed back, to resume


def test_a_misspelt_flag_gets_a_did_you_mean():
    with pytest.raises(ConfigError) as error:
        parse_args(["--epoch", "2"])
    assert str(error.value) == "unrecognized arguments: --epoch 2 (--epoch: did you mean --epochs?)"


@pytest.mark.parametrize("args", [["--help"], ["--epoch", "2"]])
def test_help_and_flag_errors_import_no_jax(args):
    probe = (
        "import sys\nfrom mnist_jax import train\n"
        f"try:\n    train.main({args!r})\nexcept SystemExit:\n    pass\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'jax', 'jaxlib', 'flax', 'optax', 'orbax'}))"
    )
    # A raw subprocess, not run_process: it runs a probe script that calls the entry point, not the entry point.
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stderr


def _whole_ticks(axes) -> list[float]:
    low, high = axes.get_xlim()
    return [t for t in axes.get_xticks() if low <= t <= high]


def test_pictures_have_whole_epochs_on_their_axes_name_each_trial_and_draw_each_exploit():
    from matplotlib.quiver import Quiver

    from mnist_jax.study import record as study_record
    from mnist_jax.training import curves

    # curves.png (drawn with Pillow, its x axis at `epoch_ticks`) for one epoch.
    record = {"epoch": 1, "loss": 0.5, "accuracy": 0.8, "val_loss": 0.4, "val_accuracy": 0.85}
    assert curves.curves_png([record]).startswith(b"\x89PNG")
    assert curves.epoch_ticks(1, 1) == [1]  # one epoch: the tick 1, not 0.96 ... 1.04

    def trial(i, epochs):
        return {"id": i, "status": "SUCCEEDED", "metric": 0.1 * i, "measurements": [[e, 0.1 * i] for e in epochs]}

    summary = {"metric": "accuracy", "goal": "MAXIMIZE", "trials": [trial(i, [1]) for i in (1, 2, 3)]}
    curves_axes, best_axes = study_record.study_figure(summary).axes
    assert [t.get_text() for t in curves_axes.get_legend().get_texts()] == ["trial 1", "trial 2", "trial 3"]
    assert _whole_ticks(curves_axes) == [1.0] and all(t.is_integer() for t in _whole_ticks(best_axes))
    many = {**summary, "trials": [trial(i, [1, 2]) for i in range(1, 21)]}
    curves_axes, _ = study_record.study_figure(many).axes
    assert curves_axes.get_legend() is None  # too many for a legend: each curve's id at its end
    assert sorted(int(t.get_text()) for t in curves_axes.texts) == list(range(1, 21))
    # pbt.png: an arrow for each exploit whose member trained on after it (the last epoch's has no next value).
    exploits = [{"epoch": e, "member": m, "donor": 1, "donor_metric": 0.1} for e, m in ((1, 2), (2, 3))]
    spans = [{"first_epoch": 1, "last_epoch": 2, "learning_rate": 1e-3, "dropout_one": 0.2, "dropout_two": 0.2}]
    population = {**many, "trials": many["trials"][:3], "best": None}
    figure = study_record.pbt_figure(population, exploits, spans)
    (arrows,) = [c for c in figure.axes[0].collections if isinstance(c, Quiver)]
    assert arrows.N == 1 and list(arrows.X) == [1] and list(arrows.V) == [0.2 - 0.1]
    assert all(t.is_integer() for t in _whole_ticks(figure.axes[2]))
