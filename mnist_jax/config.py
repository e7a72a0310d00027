"""The one configuration object: defaults, command-line flags, the environment, validation.

Nothing else in the package reads flags, and only this module and
`parallel.py` (for the cluster variables it owns) read the environment.
`parse_args` turns argv and the environment into a frozen, validated `Config`;
the trainer writes `Config.to_dict()` to the job dir's `config.json`.

Vertex AI: where Vertex sets `AIP_MODEL_DIR`, `AIP_CHECKPOINT_DIR` and
`AIP_TENSORBOARD_LOG_DIR`, `model.h5`, checkpoints and TensorBoard events go
there; with no `--job-dir`, the job dir is the parent of `AIP_MODEL_DIR`. Each
location's own flag wins over its variable. `CLOUD_ML_JOB_ID` and
`CLOUD_ML_TRIAL_ID` are recorded; the tuning metric goes to `CLOUD_ML_HP_METRIC_FILE`.

Flags accept the three spellings tuning services and people use:
`--dropout-one 0.2`, `--dropout-one=0.2` and `--dropout_one=0.2`. Integer flags
also accept an integral float (`--batch-size=256.0`), as tuning services send
integer parameters that way.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from mnist_jax.errors import ConfigError

DEFAULT_TRAIN_FILE = "data/mnist.pkl"
DEFAULT_JOB_DIR = "./tmp/mnist_mlp"
DEFAULT_HPT_METRIC_FILE = "/tmp/hypertune/output.metrics"  # cloudml-hypertune's default


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting of a training run (defaults are the Keras mnist_mlp's)."""

    # None means the embedded default, DEFAULT_TRAIN_FILE, fetched if absent.
    train_file: str | None = None
    job_dir: str = DEFAULT_JOB_DIR
    epochs: int = 20
    batch_size: int = 128  # global batch, split evenly over all devices
    learning_rate: float = 0.001
    dropout_one: float = 0.2
    dropout_two: float = 0.2
    seed: int = 0
    hidden_units: int = 512  # width of both hidden layers; shapes the checkpoint
    checkpoint_every: int = 1  # epochs between checkpoints
    keep_checkpoints: int = 3  # newest checkpoints kept on disk
    # Output locations; parse_args resolves them (flag, else Vertex variable, else under job_dir).
    model_dir: str = DEFAULT_JOB_DIR  # model.h5
    checkpoint_dir: str = f"{DEFAULT_JOB_DIR}/checkpoints"
    tensorboard_dir: str = f"{DEFAULT_JOB_DIR}/logs"  # each run writes to a <timestamp> directory inside
    hpt_metric_tag: str = "accuracy"  # the tuning metric's id (the study's hyperparameterMetricTag)
    hpt_metric_file: str = DEFAULT_HPT_METRIC_FILE  # CLOUD_ML_HP_METRIC_FILE: where the tuning service reads it
    job_id: str | None = None  # CLOUD_ML_JOB_ID
    trial_id: str | None = None  # CLOUD_ML_TRIAL_ID
    # Multi-host: all three, or none (then CLUSTER_SPEC or Cloud TPU detection decides).
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

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
    _add(
        parser,
        "train_file",
        default=None,
        metavar="PATH",
        help=f"pickle/npz of ((x_train, y_train), (x_test, y_test)); local, file:// or gs:// "
        f"(default: {DEFAULT_TRAIN_FILE}, downloaded if absent)",
    )
    _add(
        parser,
        "job_dir",
        default=None,
        metavar="DIR",
        help=f"where outputs go; local or gs:// (default: the parent of $AIP_MODEL_DIR, else {DEFAULT_JOB_DIR})",
    )
    _add(parser, "epochs", type=positive_int, default=defaults.epochs)
    _add(
        parser,
        "batch_size",
        type=positive_int,
        default=defaults.batch_size,
        help="global batch size; must divide evenly over the devices",
    )
    _add(
        parser,
        "learning_rate",
        type=_float_in(0, math.inf, low_open=True, high_open=True),
        default=defaults.learning_rate,
        help="RMSprop learning rate",
    )
    for name in ("dropout_one", "dropout_two"):
        _add(
            parser,
            name,
            type=_float_in(0, 1, low_open=False, high_open=True),
            default=getattr(defaults, name),
            help="dropout rate in [0, 1)",
        )
    _add(parser, "seed", type=_int_at_least(0), default=defaults.seed)
    _add(parser, "hidden_units", type=positive_int, default=defaults.hidden_units)
    _add(
        parser,
        "checkpoint_every",
        type=positive_int,
        default=defaults.checkpoint_every,
        help="save a checkpoint every N epochs (and always after the last)",
    )
    _add(
        parser,
        "keep_checkpoints",
        type=positive_int,
        default=defaults.keep_checkpoints,
        help="how many of the newest checkpoints to keep",
    )
    _add(
        parser,
        "model_dir",
        default=None,
        metavar="DIR",
        help="where model.h5 goes (default: $AIP_MODEL_DIR, else the job dir)",
    )
    _add(
        parser,
        "checkpoint_dir",
        default=None,
        metavar="DIR",
        help="checkpoint directory (default: $AIP_CHECKPOINT_DIR, else <job-dir>/checkpoints)",
    )
    _add(
        parser,
        "tensorboard_dir",
        default=None,
        metavar="DIR",
        help="TensorBoard log directory (default: $AIP_TENSORBOARD_LOG_DIR, else <job-dir>/logs)",
    )
    _add(
        parser,
        "hpt_metric_tag",
        default=defaults.hpt_metric_tag,
        metavar="TAG",
        help="tag of the validation accuracy reported to hyperparameter tuning",
    )
    _add(
        parser,
        "coordinator_address",
        default=None,
        metavar="HOST:PORT",
        help="multi-host: address of process 0's coordinator",
    )
    _add(parser, "num_processes", type=positive_int, default=None, help="multi-host: number of processes")
    _add(parser, "process_id", type=_int_at_least(0), default=None, help="multi-host: this process's index")
    return parser


def _parent(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[0]


def parse_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Parses trainer flags and the environment into a validated `Config`; raises `ConfigError`."""
    env = os.environ if environ is None else environ
    values = vars(build_parser().parse_args(argv))
    vertex_model_dir = env.get("AIP_MODEL_DIR")
    job_dir = values["job_dir"] or (_parent(vertex_model_dir) if vertex_model_dir else DEFAULT_JOB_DIR)
    values.update(
        job_dir=job_dir,
        model_dir=values["model_dir"] or vertex_model_dir or job_dir,
        checkpoint_dir=values["checkpoint_dir"]
        or env.get("AIP_CHECKPOINT_DIR")
        or f"{job_dir.rstrip('/')}/checkpoints",
        tensorboard_dir=values["tensorboard_dir"]
        or env.get("AIP_TENSORBOARD_LOG_DIR")
        or f"{job_dir.rstrip('/')}/logs",
        hpt_metric_file=env.get("CLOUD_ML_HP_METRIC_FILE", DEFAULT_HPT_METRIC_FILE),
        job_id=env.get("CLOUD_ML_JOB_ID"),
        trial_id=env.get("CLOUD_ML_TRIAL_ID"),
    )
    cluster = [values[k] for k in ("coordinator_address", "num_processes", "process_id")]
    if any(v is not None for v in cluster) and any(v is None for v in cluster):
        raise ConfigError("--coordinator-address, --num-processes and --process-id go together")
    if values["process_id"] is not None and values["process_id"] >= values["num_processes"]:
        raise ConfigError(
            f"--process-id {values['process_id']} must be below --num-processes {values['num_processes']}"
        )
    return Config(**values)
