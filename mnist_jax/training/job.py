"""The training job: one trial, the flags' own, in the one training loop with one lane.

`run` checks the job dir before any heavy work (a file where the job dir
should be, a job dir that holds more epochs than `--epochs`), starts
multi-host JAX when the job spans hosts, and trains. A failure of the trial is
the job's error. With `--schedule`, the trial is a population member's recipe
(`schedule.json`): its first span's settings and seed, its epochs and
shapes, and at each later span's first epoch the settings and random stream
it names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from mnist_jax.common import cli, log, storage
from mnist_jax.common.errors import ConfigError, MnistJaxError
from mnist_jax.common.status import Status
from mnist_jax.training.config import PERTURBABLE, SHARED, Config
from mnist_jax.training.source import Outcome, Perturbation, TrialSource

SPAN_KEYS = ("first_epoch", "last_epoch", "seed", *PERTURBABLE)


class OneTrial(TrialSource):
    """The job's only trial, as a loop's trial source; a failure of it is the job's error."""

    def __init__(self, config: Config) -> None:
        self.pending: list[Config] = [config]

    def next_trial(self) -> Config | None:
        return self.pending.pop() if self.pending else None

    def trial_done(self, config: Config, outcome: Outcome) -> None:
        if outcome.status == Status.FAILED:
            raise MnistJaxError(outcome.error)

    def say(self, config: Config, message: str) -> None:
        log.logger.info(message)


class ScheduleTrial(OneTrial):
    """A recipe's spans replayed: each span's settings, and its seed's random stream, from its first epoch."""

    def __init__(self, config: Config, spans: Sequence[dict[str, Any]]) -> None:
        super().__init__(config)
        self.spans = spans

    def _in_force(self, config: Config, epoch: int) -> tuple[Config, dict[str, Any]]:
        """The span that trains epoch `epoch`, and `config` with its settings."""
        span = next(s for s in self.spans if s["first_epoch"] <= epoch <= s["last_epoch"])
        return dataclasses.replace(config, **{name: span[name] for name in PERTURBABLE}), span

    def resumed(self, config: Config, epoch: int) -> tuple[Config, str | None]:
        return self._in_force(config, min(epoch + 1, config.epochs))[0], None

    def perturb(self, ended: Sequence[tuple[Config, dict[str, Any]]]) -> list[Perturbation]:
        ((config, record),) = ended
        epoch = record["epoch"]
        if epoch >= config.epochs or not any(s["first_epoch"] == epoch + 1 for s in self.spans):
            return []
        changed, span = self._in_force(config, epoch + 1)
        return [Perturbation(config, None, changed, stream=span["seed"])]


def read_schedule(config: Config) -> tuple[Config, list[dict[str, Any]]]:
    """The job `--schedule` describes: `config` with the recipe's first settings, seed, epochs and shapes."""
    path = config.schedule
    recipe = cli.read_mapping(path, "--schedule")  # type: ignore[arg-type]
    try:
        spans = [{key: span[key] for key in SPAN_KEYS} for span in recipe["spans"]]
        shapes = {key: recipe[key] for key in SHARED if key != "train_file"}
    except (KeyError, TypeError) as e:
        raise ConfigError(f"--schedule {path}: not a population member's schedule.json (no {e})") from None
    ends = [span["last_epoch"] for span in spans]
    if not spans or [span["first_epoch"] for span in spans] != [1, *(end + 1 for end in ends[:-1])]:
        raise ConfigError(f"--schedule {path}: its spans must cover epochs 1.. one after another")
    first = {name: spans[0][name] for name in PERTURBABLE}
    return dataclasses.replace(config, seed=spans[0]["seed"], epochs=ends[-1], **shapes, **first), spans


def run(config: Config) -> None:
    """Trains the job `config` describes (imports JAX: flags, and --help, are answered before it loads)."""
    source: TrialSource = OneTrial(config)
    if config.schedule:
        config, spans = read_schedule(config)
        source = ScheduleTrial(config, spans)
    storage.make_dirs(config.job_dir, "--job-dir")
    import jax

    from mnist_jax.training import checkpoint, loop, parallel, steps

    log.configure(config.log_format, verbose=config.verbose)
    parallel.initialize(config)  # before any other JAX call, Orbax's included
    log.configure(config.log_format, verbose=config.verbose, quiet=jax.process_index() != 0)
    saved = checkpoint.saved_epoch(config.checkpoint_dir)
    if saved is not None:  # before the data is read: a refused job costs nothing
        checkpoint.check_epochs(config, saved)
    if config.job_id or config.trial_id:
        log.logger.info(f"Vertex AI job {config.job_id or '-'}, trial {config.trial_id or '-'}")
    steps.enable_compile_cache()
    loop.train_lanes(config, source, lanes=1)
