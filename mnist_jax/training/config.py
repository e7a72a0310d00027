"""The one configuration object: defaults, command-line flags, config files, the environment, validation.

Nothing else in the package reads trainer flags, and only this module and
`parallel` (for the cluster variables it owns) read the environment.
`parse_args` turns argv and the environment into a frozen, validated `Config`;
the trainer writes `Config.to_dict()` to the job dir's `config.json`.

Each setting is declared once, as its `Config` field (`setting(...)`): its
default, flag parser, help, and what it means to the rest of the package
(whether lanes must share it, whether it shapes a checkpoint, whether
TensorBoard shows it, whether it is a location or recorded only). `FLAGS`,
`SHARED`, `SHAPING`, `HPARAMS`, `LOCATIONS`, `OUTPUT_FLAGS` and
`RECORDED_ONLY` are derived from those declarations; adding a setting is one
field plus the code that uses it. `--config FILE` reads a job's `config.json`
(or a YAML mapping of flags) as defaults, and flags given on the command line
win, so `python -m mnist_jax.train --config JOB/config.json` reruns a job
exactly.

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
from typing import Any, NamedTuple

from mnist_jax.common import cli, log
from mnist_jax.common.errors import ConfigError
from mnist_jax.data.download import DEFAULT_TRAIN_FILE

DEFAULT_JOB_DIR = "./tmp/mnist_mlp"
DEFAULT_HPT_METRIC_FILE = "/tmp/hypertune/output.metrics"  # cloudml-hypertune's default
CONFIG_FILE = "config.json"  # in each job dir: every resolved setting
LANE_GROUPS_DIR = "lanes"  # under a study's job dir: each run of lanes saves its group there


_positive = cli.int_at_least(1)
_UNITS = {"s": 1, "m": 60, "h": 3600}


def _cadence(text: str) -> str:
    """`N` epochs (an integral float too) as "N", or a duration with a unit as seconds, "Ss"."""
    unit = text[-1:].lower()
    if unit not in _UNITS:
        return str(_positive(text))
    try:
        seconds = float(text[:-1]) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected epochs or a duration such as 30s, got {text!r}") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise argparse.ArgumentTypeError(f"must be a duration >= 0, got {text}")
    return f"{seconds:g}s"


_rate = cli.float_in(0, 1, low_open=False, high_open=True)


class Setting(NamedTuple):
    """What one setting means, beside its name, type and default (its `Config` field)."""

    parse: Callable[[str], Any] | None  # the flag's parser; None: a switch
    help: str
    metavar: str | None = None
    flag: bool = True  # False: from the environment alone; config.json records it, --config ignores it
    resolved: bool = False  # its flag's default is None: parse_args resolves it (Vertex's variables, the job dir)
    location: bool = False  # an output location under the job dir unless set
    shared: bool = False  # every lane of one program must have the same value: it fixes the data or the shapes
    shaping: bool = False  # it fixes a checkpoint's shapes: a different value cannot resume it
    hparam: bool = False  # TensorBoard shows it as a hyperparameter
    perturbable: bool = False  # a value of a lane's program, never a shape: it may change while the lane trains
    output: bool = False  # an output flag every command-line entry point takes


def setting(
    default: Any, parse: Callable[[str], Any] | None, help: str, metavar: str | None = None, **means: bool
) -> Any:
    """A `Config` field and everything it means, declared in one place."""
    return dataclasses.field(default=default, metadata={"setting": Setting(parse, help, metavar, **means)})


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting of a training run (defaults are the Keras mnist_mlp's), each declared once."""

    train_file: str | None = setting(  # None: the embedded default, DEFAULT_TRAIN_FILE, fetched if absent
        None,
        cli.text,
        f"pickle/npz of ((x_train, y_train), (x_test, y_test)); local, file:// or gs:// "
        f"(default: {DEFAULT_TRAIN_FILE}, downloaded if absent)",
        "PATH",
        shared=True,
    )
    job_dir: str = setting(
        DEFAULT_JOB_DIR,
        cli.text,
        f"where outputs go; local or gs:// (default: the parent of $AIP_MODEL_DIR, else {DEFAULT_JOB_DIR})",
        "DIR",
        resolved=True,
    )
    epochs: int = setting(20, _positive, "total epochs; a rerun with more trains only the extra ones", hparam=True)
    batch_size: int = setting(  # the global batch, split evenly over the devices of a lane
        128, _positive, "global batch size; must divide evenly over the devices", shared=True, hparam=True
    )
    learning_rate: float = setting(
        0.001,
        cli.float_in(0, math.inf, low_open=True, high_open=True),
        "RMSprop learning rate",
        hparam=True,
        perturbable=True,
    )
    dropout_one: float = setting(
        0.2, _rate, "dropout rate after the first hidden layer, in [0, 1)", hparam=True, perturbable=True
    )
    dropout_two: float = setting(
        0.2, _rate, "dropout rate after the second hidden layer, in [0, 1)", hparam=True, perturbable=True
    )
    seed: int = setting(0, cli.int_at_least(0), "initialization, shuffling and dropout all derive from it", hparam=True)
    schedule: str | None = setting(
        None,
        cli.text,
        "a population member's schedule.json: train its recipe (settings, seeds, epochs and shapes) from scratch "
        "(default: none)",
        "FILE",
    )
    hidden_units: int = setting(512, _positive, "width of both hidden layers", shared=True, shaping=True, hparam=True)
    validation_split: float = setting(
        0.0,
        _rate,
        "hold out this last fraction of the training set for the val_* metrics and the tuning metric; "
        "0 validates on the test set",
        shared=True,
    )
    checkpoint_every: str = setting(  # "N": every N epochs; "Ss": at the first epoch end S seconds after the last save
        "30s",
        _cadence,
        "save a checkpoint every N epochs, or with a unit (30s, 5m, 1h) at the first epoch end that long after "
        "the last save; the last epoch, a stop and SIGTERM always save",
        "N|DURATION",
    )
    keep_checkpoints: int = setting(3, _positive, "how many of the newest checkpoints to keep")
    model_dir: str = setting(
        DEFAULT_JOB_DIR, cli.text, "where model.h5 goes (default: $AIP_MODEL_DIR, else the job dir)", "DIR",
        resolved=True, location=True,
    )  # fmt: skip
    checkpoint_dir: str = setting(
        f"{DEFAULT_JOB_DIR}/checkpoints", cli.text,
        "checkpoint directory (default: $AIP_CHECKPOINT_DIR, else <job-dir>/checkpoints)", "DIR",
        resolved=True, location=True,
    )  # fmt: skip
    tensorboard_dir: str = setting(  # each run writes to a <timestamp> directory inside
        f"{DEFAULT_JOB_DIR}/logs", cli.text,
        "TensorBoard log directory (default: $AIP_TENSORBOARD_LOG_DIR, else <job-dir>/logs)", "DIR",
        resolved=True, location=True,
    )  # fmt: skip
    hpt_metric_tag: str = setting(  # the tuning metric's id (the study's hyperparameterMetricTag)
        "accuracy", cli.text, "tag of the validation accuracy reported to hyperparameter tuning", "TAG"
    )
    hpt_metric_file: str = setting(  # CLOUD_ML_HP_METRIC_FILE: where the tuning service reads it
        DEFAULT_HPT_METRIC_FILE, None, "", flag=False
    )
    job_id: str | None = setting(None, None, "", flag=False)  # CLOUD_ML_JOB_ID
    trial_id: str | None = setting(None, None, "", flag=False)  # CLOUD_ML_TRIAL_ID
    # Multi-host: all three, or none (then CLUSTER_SPEC or Cloud TPU detection decides).
    coordinator_address: str | None = setting(
        None,
        cli.text,
        "multi-host: address of process 0's coordinator (default: $CLUSTER_SPEC, else one process)",
        "HOST:PORT",
    )
    num_processes: int | None = setting(None, _positive, "multi-host: number of processes (default: one process)")
    process_id: int | None = setting(
        None, cli.int_at_least(0), "multi-host: this process's index (default: one process)"
    )
    log_format: str = setting(
        "text",
        cli.choice(*log.FORMATS),
        "text, or json: one JSON object per line with severity and message",
        output=True,
    )
    verbose: bool = setting(False, None, "also show the libraries' own logs and warnings", output=True)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SETTINGS: dict[str, Setting] = {f.name: f.metadata["setting"] for f in dataclasses.fields(Config)}
CONFIG_FLAG = Setting(
    cli.text,
    "a job's config.json, or a YAML mapping of these flags, read as defaults; flags given here win (default: none)",
    "FILE",
    resolved=True,
)


def names(meaning: str) -> tuple[str, ...]:
    """The settings that have `meaning` (a `Setting` field: shared, shaping, hparam, location...), in order."""
    return tuple(name for name, each in SETTINGS.items() if getattr(each, meaning))


# The groups the rest of the package reads, each derived from the declarations above.
FLAGS = ("config", *names("flag"))  # every trainer flag, --config first
LOCATIONS = names("location")
SHARED = names("shared")
SHAPING = names("shaping")
HPARAMS = names("hparam")
PERTURBABLE = names("perturbable")
OUTPUT_FLAGS = names("output")
RECORDED_ONLY = (*(name for name, each in SETTINGS.items() if not each.flag), "runtime")  # runtime: config.json's


def _declared(name: str) -> Setting:
    """A flag's declaration: --config's own, or its setting's."""
    return CONFIG_FLAG if name == "config" else SETTINGS[name]


def flag_name(name: str) -> str:
    """A setting's flag spelling: `dropout_one` -> `dropout-one`."""
    return name.replace("_", "-")


def field_name(name: str) -> str:
    """A flag's or study parameter's setting: `dropout-one` (or `dropout_one`) -> `dropout_one`."""
    return str(name).replace("-", "_")


def flag_text(value: Any) -> str:
    """A value as a flag takes it back unchanged: floats in full (repr), the rest as str."""
    return repr(value) if isinstance(value, float) else str(value)


def add_flags(parser: argparse.ArgumentParser, names: Sequence[str]) -> None:
    """Declares the named `FLAGS` on `parser`, each in its dashed and underscored spelling."""
    defaults = Config()
    for name in names:
        flag = _declared(name)
        dashed = "--" + flag_name(name)
        spellings = [dashed] if dashed == "--" + name else [dashed, "--" + name]
        if flag.parse is None:
            parser.add_argument(*spellings, dest=name, action="store_true", help=flag.help)
            continue
        default = None if flag.resolved else getattr(defaults, name)
        parser.add_argument(
            *spellings, dest=name, type=flag.parse, default=default, metavar=flag.metavar, help=flag.help
        )


def check_tunable(parameters: Sequence[str], where: str) -> None:
    """Each of `parameters` (a study's) is a trainer flag a trial can be given; else a ConfigError that
    names the nearest one."""
    tunable = [flag_name(name) for name in FLAGS if not _declared(name).resolved]
    for name in parameters:
        if flag_name(field_name(name)) not in tunable:
            raise ConfigError(f"{where}: parameter {name} is not a trainer flag{cli.did_you_mean(name, tunable)}")


def build_parser(prog: str = "python -m mnist_jax.train") -> argparse.ArgumentParser:
    """The trainer's flags: all of `FLAGS`; defaults come from `Config`."""
    parser = cli.Parser(prog=prog, description="Train the Keras mnist_mlp data-parallel on every device.")
    add_flags(parser, FLAGS)
    return parser


def _locations(job_dir: str) -> dict[str, str]:
    """Where outputs go under `job_dir` when neither a flag nor Vertex says otherwise."""
    base = job_dir.rstrip("/")
    return {"model_dir": job_dir, "checkpoint_dir": f"{base}/checkpoints", "tensorboard_dir": f"{base}/logs"}


def read_config_file(path: str) -> dict[str, Any]:
    """The settings in a config.json or YAML of flags, parsed as their flags would be."""
    document = cli.read_mapping(path, "--config")
    settings = {field_name(k): v for k, v in document.items() if k not in RECORDED_ONLY}
    unknown = sorted(set(settings) - set(FLAGS))
    if unknown:
        raise ConfigError(f"--config {path}: unknown settings {', '.join(unknown)}")
    # Locations that only follow the job dir are not pinned: `--job-dir NEW` moves them too.
    derived = _locations(settings["job_dir"]) if settings.get("job_dir") else {}
    values: dict[str, Any] = {}
    for name, value in settings.items():
        if value is None or name == "config" or derived.get(name) == value:
            continue
        flag = SETTINGS[name]
        if flag.parse is None:
            values[name] = bool(value)
            continue
        try:
            values[name] = flag.parse(flag_text(value))
        except argparse.ArgumentTypeError as e:
            raise ConfigError(f"--config {path}: {name}: {e}") from None
    return values


def parse_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Parses trainer flags, a --config file and the environment into a validated `Config`; raises `ConfigError`."""
    env = os.environ if environ is None else environ
    parser = build_parser()
    first = cli.Parser(add_help=False)
    first.add_argument("--config", type=cli.text, default=None)
    config_file = first.parse_known_args(argv)[0].config
    if config_file:
        parser.set_defaults(**read_config_file(config_file))
    values = vars(parser.parse_args(argv))
    del values["config"]
    vertex_model_dir = env.get("AIP_MODEL_DIR")
    job_dir = values["job_dir"] or (_parent(vertex_model_dir) if vertex_model_dir else DEFAULT_JOB_DIR)
    derived = _locations(job_dir)
    vertex = {
        "model_dir": vertex_model_dir,
        "checkpoint_dir": env.get("AIP_CHECKPOINT_DIR"),
        "tensorboard_dir": env.get("AIP_TENSORBOARD_LOG_DIR"),
    }
    values.update(
        job_dir=job_dir,
        **{name: values[name] or vertex[name] or derived[name] for name in LOCATIONS},
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


def _parent(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[0]
