"""`python -m mnist_jax.export --checkpoint <job-dir>/checkpoints [--step N] --out model.h5`: writes any saved
checkpoint as a Keras `model.h5` (`mnist_jax.model.keras_h5`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from mnist_jax.common import cli
from mnist_jax.common.log import logger
from mnist_jax.model.keras_h5 import write_model
from mnist_jax.training import checkpoint, config


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.Parser(prog="python -m mnist_jax.export", description="Export a checkpoint as model.h5.")
    parser.add_argument(
        "--checkpoint", required=True, help="a job's checkpoints directory, local or gs:// (default: required)"
    )
    parser.add_argument("--step", type=int, default=None, help="global step to export (default: the newest)")
    parser.add_argument("--out", required=True, help="where to write the .h5, local or gs:// (default: required)")
    config.add_flags(parser, config.OUTPUT_FLAGS)

    def export(args: Any) -> None:
        params, saved, step = checkpoint.load_params(args.checkpoint, args.step)
        write_model(args.out, params, (saved["dropout_one"], saved["dropout_two"]), saved["learning_rate"])
        logger.info(f"Wrote {args.out} from step {step} of {args.checkpoint}")

    return cli.main(parser, argv, export)


if __name__ == "__main__":
    sys.exit(main())
