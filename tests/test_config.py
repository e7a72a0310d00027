"""Flags: spellings, integer floats, validation messages."""

from __future__ import annotations

import pytest

from mnist_jax.config import Config, parse_args
from mnist_jax.errors import ConfigError


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
