"""Building a run of the training loop: the mesh, the data on the devices, the compiled programs of its lanes,
and the start-up lines a user sees (the samples, the model's summary, the devices)."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from mnist_jax.common.errors import ConfigError
from mnist_jax.common.log import logger
from mnist_jax.data import dataset, download
from mnist_jax.model.mlp import MLP, count_params
from mnist_jax.training import metrics, parallel, placement, steps
from mnist_jax.training.config import Config


@dataclasses.dataclass(frozen=True)
class Setup:
    """What every epoch of a run shares: `base` fixes the data and the shapes of all its lanes."""

    base: Config
    lanes: int
    mesh: Mesh
    train_file: str  # resolved: the default is fetched before the run starts
    data: placement.Placed
    program: steps.Program
    abstract: Any  # one lane's TrainState, as shapes
    bar: metrics.ProgressBar | None  # the solo job's in-epoch progress, on a terminal
    is_main: bool  # process 0: the one that writes outputs and speaks

    def say(self, message: str) -> None:
        """A line for the console; process 0 alone speaks."""
        if self.is_main:
            logger.info(message)


def build(base: Config, lanes: int) -> Setup:
    """Places the data and compiles the programs of `lanes` lanes on every device, saying what it found."""
    is_main = jax.process_index() == 0
    if lanes > 1 and jax.process_count() > 1:
        raise ConfigError(
            f"--vectorize {lanes}: lanes train in one process; with {jax.process_count()} processes, "
            "run each trial as a process of its own (--vectorize 1)"
        )
    mesh = parallel.make_mesh(lanes)
    parallel.check_batch_size(base.batch_size, mesh)
    train_file = download.resolve_train_file(base.train_file)
    # The host's copy is dropped once placed: the devices hold theirs, and a second would only raise peak memory.
    data = placement.place(dataset.load(train_file), mesh, base.validation_split)
    say = logger.info if is_main else (lambda message: None)
    if data.test is None:
        say(f"{data.train_examples} train samples\n{data.test_examples} test samples")
    else:
        say(
            f"{data.train_examples} train samples\n{data.validation_examples} validation samples "
            f"(the last {base.validation_split:g} of the training set)\n{data.test_examples} test samples"
        )
    model = MLP(hidden_units=base.hidden_units)
    solo_terminal = lanes == 1 and is_main and sys.stdout.isatty() and base.log_format == "text"
    bar = metrics.ProgressBar(-(-data.train_examples // base.batch_size)) if solo_terminal else None
    progress = None if bar is None else (lambda done: bar.update(int(done)))
    program = steps.compile_program(model, base.batch_size, mesh, lanes, progress)
    abstract = jax.eval_shape(program.fresh, jax.random.PRNGKey(0), jnp.float32(0))
    if lanes == 1:
        say(metrics.model_summary(abstract.params, (base.dropout_one, base.dropout_two)))
    say(
        f"Training on {jax.device_count()} {jax.devices()[0].platform} device(s), {jax.process_count()} "
        f"process(es)" + (f", {lanes} lanes" if lanes > 1 else "") + f"; {count_params(abstract.params):,} parameters"
    )
    return Setup(base, lanes, mesh, train_file, data, program, abstract, bar, is_main)
