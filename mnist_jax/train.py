"""`python -m mnist_jax.train [flags]`: trains the Keras mnist_mlp data-parallel on every device.

Exit status: 0 when trained and exported, 2 with a one-line error, 143 after
SIGTERM and 130 after Ctrl-C once the epoch in flight is saved (rerun the same
command to continue).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from mnist_jax.common import cli
from mnist_jax.training import job
from mnist_jax.training.config import parse_args


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(lambda: job.run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
