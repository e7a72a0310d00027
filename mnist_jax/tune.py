"""`python -m mnist_jax.tune convert CONFIG` and `python -m mnist_jax.tune run --config CONFIG --job-dir DIR
[--storage URL] [--vectorize K] [--stopping RULE] ... [-- trainer flags]`: hyperparameter studies on this
machine, the way Vertex AI runs them (`mnist_jax.study`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from mnist_jax.common import cli
from mnist_jax.study.cli import command


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(lambda: command(list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
