"""`python -m mnist_jax.predict --model PATH [--input FILE] [--output FILE]`: predictions for images from the
command line.

Inputs (`mnist_jax.serving.images`): a `.npy`, a 28x28 PNG, or Vertex AI's
`{"instances": [...]}` JSON from a file or stdin. Output:
`{"predictions": [{"label": 7, "probabilities": [...]}, ...]}`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from mnist_jax.common import cli, storage
from mnist_jax.serving.images import read_image_file
from mnist_jax.serving.predict import load_model, predictions
from mnist_jax.training import config


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.Parser(
        prog="python -m mnist_jax.predict",
        description="Predictions: load a model (a Keras `.h5` or a checkpoint directory), read images, predict.",
    )
    parser.add_argument(
        "--model", required=True, help="a model.h5 or a checkpoints directory, local or gs:// (default: required)"
    )
    parser.add_argument("--input", default=None, help=".npy, .png or instances JSON (default: JSON on stdin)")
    parser.add_argument("--output", default=None, help="where to write the JSON (default: stdout)")
    config.add_flags(parser, config.OUTPUT_FLAGS)

    def predict(args: Any) -> None:
        images = read_image_file(args.input)
        result = json.dumps(predictions(load_model(args.model)(images)))
        if args.output:
            storage.write_bytes_atomic(args.output, (result + "\n").encode())
        else:
            print(result)

    return cli.main(parser, argv, predict)


if __name__ == "__main__":
    sys.exit(main())
