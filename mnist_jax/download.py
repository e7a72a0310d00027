"""`python -m mnist_jax.download [--out data/mnist.pkl]`: writes verified MNIST in the seed's pickle format."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from mnist_jax.common import cli
from mnist_jax.data.download import DEFAULT_TRAIN_FILE, download
from mnist_jax.training import config


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.Parser(
        prog="python -m mnist_jax.download",
        description="Download MNIST, convert it and verify it, as the seed's pickle.",
    )
    parser.add_argument("--out", default=DEFAULT_TRAIN_FILE, help="local path or gs:// URI")
    config.add_flags(parser, config.OUTPUT_FLAGS)
    return cli.main(parser, argv, lambda args: download(args.out))


if __name__ == "__main__":
    sys.exit(main())
