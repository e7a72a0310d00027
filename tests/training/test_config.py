"""Flags: spellings, integer floats, validation messages, --config files, --help, JSON logs."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from mnist_jax.common.errors import ConfigError
from mnist_jax.training import config as flags
from mnist_jax.training.config import Config, parse_args

from helpers import run_here


def test_defaults_are_the_seeds():
    config = parse_args([])
    assert config == Config()
    assert (config.epochs, config.batch_size, config.learning_rate) == (20, 128, 0.001)
    assert (config.dropout_one, config.dropout_two, config.job_dir) == (0.2, 0.2, "./tmp/mnist_mlp")


@pytest.mark.parametrize(
    "argv",
    [
        ["--dropout-one", "0.3"],
        ["--dropout-one=0.3"],
        ["--dropout_one=0.3"],
        ["--dropout_one", "0.3"],
    ],
)
def test_flag_spellings(argv):
    assert parse_args(argv).dropout_one == 0.3


def test_integer_flags_accept_integral_floats():
    config = parse_args(["--batch-size=256.0", "--epochs", "3.0"])
    assert (config.batch_size, config.epochs) == (256, 3)
    assert isinstance(config.batch_size, int)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dropout-one", "1.0"], r"--dropout-one/--dropout_one: must be in \[0, 1\), got 1.0"),
        (["--dropout_two=-0.1"], r"--dropout-two/--dropout_two: must be in \[0, 1\)"),
        (["--batch-size", "0"], r"--batch-size/--batch_size: must be >= 1, got 0"),
        (["--batch-size", "2.5"], r"--batch-size/--batch_size: expected an integer"),
        (["--epochs", "0"], r"--epochs: must be >= 1"),
        (["--learning-rate", "0"], r"--learning-rate/--learning_rate: must be in \(0, inf\)"),
        (["--learning-rate", "nan"], r"--learning-rate/--learning_rate: must be in"),
        (["--learning-rate", "fast"], r"expected a number, got 'fast'"),
        (["--no-such-flag"], r"unrecognized arguments: --no-such-flag"),
    ],
)
def test_bad_values_name_the_flag(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(argv)


def test_a_jobs_config_json_reruns_it_and_flags_win(tmp_path):

    first = parse_args(["--job-dir", str(tmp_path / "a"), "--epochs", "3", "--dropout_one=0.3", "--seed", "9"])
    (tmp_path / "config.json").write_text(json.dumps({**first.to_dict(), "train_file": "data/x.pkl", "runtime": {}}))
    again = parse_args(["--config", str(tmp_path / "config.json")])
    assert again == dataclasses.replace(first, train_file="data/x.pkl")
    moved = parse_args(["--config", str(tmp_path / "config.json"), "--job-dir", str(tmp_path / "b"), "--seed", "1"])
    assert (moved.seed, moved.epochs, moved.dropout_one) == (1, 3, 0.3)
    assert moved.checkpoint_dir == f"{tmp_path / 'b'}/checkpoints" and moved.model_dir == str(tmp_path / "b")
    (tmp_path / "flags.yaml").write_text("epochs: 4.0\nlearning-rate: 0.01\nverbose: true\n")
    from_yaml = parse_args(["--config", str(tmp_path / "flags.yaml")])
    assert (from_yaml.epochs, from_yaml.learning_rate, from_yaml.verbose) == (4, 0.01, True)
    (tmp_path / "bad.yaml").write_text("epochs: 0\n")
    with pytest.raises(ConfigError, match=r"--config .*bad.yaml: epochs: must be >= 1, got 0"):
        parse_args(["--config", str(tmp_path / "bad.yaml")])
    (tmp_path / "unknown.yaml").write_text("epochz: 3\n")
    with pytest.raises(ConfigError, match="unknown settings epochz"):
        parse_args(["--config", str(tmp_path / "unknown.yaml")])
    with pytest.raises(ConfigError, match="no such file"):
        parse_args(["--config", str(tmp_path / "missing.json")])
    assert set(flags.FLAGS) >= set(Config().to_dict()) - set(flags.RECORDED_ONLY)


ENTRY_POINTS = [
    ("train", []),
    ("tune", ["run"]),
    ("download", []),
    ("export", []),
    ("predict", []),
    ("serve", []),
]


@pytest.mark.parametrize("module, command", ENTRY_POINTS, ids=lambda v: str(v))
def test_help_lists_every_flag_with_its_default(module, command):
    result = run_here(module, [*command, "--help"])
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    options = [o for o in re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", text) if o != "--help"]
    assert options, text
    # Each flag's entry ends with its default.
    entries = re.split(r" (?=--[a-z][a-z-]+[ ,=A-Z])", text.split("options:")[-1])
    for entry in entries:
        if entry.startswith("--") and not entry.startswith("--help"):
            assert "(default:" in entry, entry


def test_json_log_format_writes_one_object_per_line(tmp_path):
    result = run_here(
        "train", ["--log-format", "json", "--train-file", str(tmp_path / "none.pkl"), "--job-dir", str(tmp_path)]
    )
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert json.loads(line) == {"severity": "ERROR", "message": f"train file not found: {tmp_path / 'none.pkl'}"}


def test_every_group_of_settings_is_derived_from_the_one_declaration_of_each():
    """Adding a setting is one `Config` field (`config.setting`) plus its use: these groups follow from it."""
    assert flags.SHARED == ("train_file", "batch_size", "hidden_units", "validation_split")  # lanes share them
    assert flags.SHAPING == ("hidden_units",)  # a checkpoint records and compares them
    assert flags.HPARAMS == ("epochs", "batch_size", "learning_rate", "dropout_one", "dropout_two", "seed",
                             "hidden_units")  # fmt: skip
    assert flags.LOCATIONS == ("model_dir", "checkpoint_dir", "tensorboard_dir")
    assert flags.OUTPUT_FLAGS == ("log_format", "verbose")
    assert flags.RECORDED_ONLY == ("hpt_metric_file", "job_id", "trial_id", "runtime")
    assert flags.FLAGS == ("config", *(n for n in Config().to_dict() if n not in flags.RECORDED_ONLY))
    for name, setting in flags.SETTINGS.items():  # every field is declared, with help for every flag
        assert setting.help or not setting.flag, name
    assert (flags.flag_name("dropout_one"), flags.field_name("dropout-one"), flags.field_name("dropout_one")) == (
        "dropout-one",
        "dropout_one",
        "dropout_one",
    )
    assert (flags.flag_text(0.1 + 0.2), flags.flag_text(3)) == ("0.30000000000000004", "3")
