"""The command-line entry points' shared tail: one line for what went wrong, and the exit status it means."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from mnist_jax import log
from mnist_jax.errors import MnistJaxError, report
from mnist_jax.log import logger
from mnist_jax.preemption import INTERRUPTED_STATUS, Preempted


def run(body: Callable[[], int | None]) -> int:
    """Runs an entry point's `body`: 0 (or its status) when it returns, 143/130 after SIGTERM/Ctrl-C once the
    work in hand is saved, 2 with a one-line error, 130 with one line for a Ctrl-C before anything was saved."""
    try:
        return body() or 0
    except Preempted as e:
        logger.warning(f"{e.verb}: {e}")
        return e.status
    except MnistJaxError as e:
        return report(e)
    except KeyboardInterrupt:
        logger.warning("interrupted (Ctrl-C)")
        return INTERRUPTED_STATUS


def main(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, body: Callable[[argparse.Namespace], int | None]
) -> int:
    """Parses `argv`, sets up the output flags (`config.OUTPUT_FLAGS`), then runs `body(args)` as `run` does."""

    def parsed() -> int | None:
        args = parser.parse_args(argv)
        log.configure(args.log_format, verbose=args.verbose)
        return body(args)

    return run(parsed)
