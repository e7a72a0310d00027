"""The one configuration object: defaults, command-line flags and validation.

Nothing else in the package reads flags. `parse_args` turns argv into a frozen
`Config`, validated once; the trainer writes `Config.to_dict()` to the job
dir's `config.json`.

Flags accept the three spellings tuning services and people use:
`--dropout-one 0.2`, `--dropout-one=0.2` and `--dropout_one=0.2`. Integer flags
also accept an integral float (`--batch-size=256.0`), as tuning services send
integer parameters that way.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

from mnist_jax.errors import ConfigError

DEFAULT_TRAIN_FILE = "data/mnist.pkl"


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting of a training run (defaults are the Keras mnist_mlp's)."""

    # None means the embedded default, DEFAULT_TRAIN_FILE, fetched if absent.
    train_file: str | None = None
    job_dir: str = "./tmp/mnist_mlp"
    epochs: int = 20
    batch_size: int = 128  # global batch, split evenly over all devices
    learning_rate: float = 0.001
    dropout_one: float = 0.2
    dropout_two: float = 0.2
    seed: int = 0
    hidden_units: int = 512  # width of both hidden layers; shapes the checkpoint
    checkpoint_every: int = 1  # epochs between checkpoints
    keep_checkpoints: int = 3  # newest checkpoints kept on disk

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not value.is_integer():
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        return int(value)

    return parse


def _float_in(low: float, high: float, *, low_open: bool, high_open: bool) -> Callable[[str], float]:
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if not math.isfinite(value) or too_low or too_high:
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {text}")
        return value

    return parse


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are exceptions, so callers print one line."""

    def error(self, message: str):  # type: ignore[override]
        raise ConfigError(message)


def _add(parser: argparse.ArgumentParser, name: str, **kwargs: Any) -> None:
    dashed = "--" + name.replace("_", "-")
    spellings = [dashed] if dashed == "--" + name else [dashed, "--" + name]
    parser.add_argument(*spellings, dest=name, **kwargs)


def build_parser(prog: str = "python -m mnist_jax.train") -> argparse.ArgumentParser:
    """The trainer's flags; defaults come from `Config`."""
    defaults = Config()
    parser = _Parser(prog=prog, allow_abbrev=False, description=__doc__.splitlines()[0])
    positive_int = _int_at_least(1)
    _add(parser, "train_file", default=None, metavar="PATH",
         help=f"pickle/npz of ((x_train, y_train), (x_test, y_test)); local, file:// or gs:// "
              f"(default: {DEFAULT_TRAIN_FILE}, downloaded if absent)")
    _add(parser, "job_dir", default=defaults.job_dir, metavar="DIR",
         help="where config.json, metrics.jsonl and checkpoints go; local or gs://")
    _add(parser, "epochs", type=positive_int, default=defaults.epochs)
    _add(parser, "batch_size", type=positive_int, default=defaults.batch_size,
         help="global batch size; must divide evenly over the devices")
    _add(parser, "learning_rate", type=_float_in(0, math.inf, low_open=True, high_open=True),
         default=defaults.learning_rate, help="RMSprop learning rate")
    for name in ("dropout_one", "dropout_two"):
        _add(parser, name, type=_float_in(0, 1, low_open=False, high_open=True),
             default=getattr(defaults, name), help="dropout rate in [0, 1)")
    _add(parser, "seed", type=_int_at_least(0), default=defaults.seed)
    _add(parser, "hidden_units", type=positive_int, default=defaults.hidden_units)
    _add(parser, "checkpoint_every", type=positive_int, default=defaults.checkpoint_every,
         help="save a checkpoint every N epochs (and always after the last)")
    _add(parser, "keep_checkpoints", type=positive_int, default=defaults.keep_checkpoints,
         help="how many of the newest checkpoints to keep")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> Config:
    """Parses trainer flags into a validated `Config`; raises `ConfigError`."""
    namespace = build_parser().parse_args(argv)
    return Config(**vars(namespace))
