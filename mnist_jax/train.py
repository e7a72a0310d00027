"""The training job: `python -m mnist_jax.train [flags]` trains the Keras mnist_mlp on every device.

The job is the one training loop (`loop.train_lanes`) with one lane and one
trial, the flags' own. Exit status: 0 when trained and exported, 2 with a
one-line error, 143 after SIGTERM and 130 after Ctrl-C once every lane is saved
(rerun the same command to continue).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from mnist_jax import cli, log
from mnist_jax.config import Config, parse_args
from mnist_jax.errors import MnistJaxError
from mnist_jax.study import Status

if TYPE_CHECKING:
    from mnist_jax import loop


class OneTrial:
    """The job's only trial, as a loop's trial source; a failure of it is the job's error."""

    def __init__(self, config: Config) -> None:
        self.pending: list[Config] = [config]

    def next_trial(self) -> Config | None:
        return self.pending.pop() if self.pending else None

    def decide(self, ended: Sequence[tuple[Config, dict]]) -> list[bool]:
        return [False] * len(ended)

    def report(self, ended: Sequence[tuple[Config, dict]]) -> None:
        pass

    def trial_done(self, config: Config, outcome: loop.Outcome) -> None:
        if outcome.status == Status.FAILED:
            raise MnistJaxError(outcome.error)

    def say(self, config: Config, message: str) -> None:
        log.logger.info(message)


def run(config: Config) -> None:
    """Trains the job `config` describes (imports JAX: flags, and --help, are answered before it loads)."""
    import jax

    from mnist_jax import loop, parallel, steps

    log.configure(config.log_format, verbose=config.verbose)
    parallel.initialize(config)
    log.configure(config.log_format, verbose=config.verbose, quiet=jax.process_index() != 0)
    if config.job_id or config.trial_id:
        log.logger.info(f"Vertex AI job {config.job_id or '-'}, trial {config.trial_id or '-'}")
    steps.enable_compile_cache()
    loop.train_lanes(config, OneTrial(config), lanes=1)


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
