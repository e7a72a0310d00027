"""`python -m mnist_jax.serve --model PATH [--host 127.0.0.1] [--port 8080]`: the online prediction server,
Vertex AI's custom-container contract with dynamic batching (`mnist_jax.serving`)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from mnist_jax.common import cli
from mnist_jax.serving.server import serve
from mnist_jax.training import config


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(
        prog="python -m mnist_jax.serve",
        description="Online predictions: a Vertex AI custom-container prediction server with dynamic batching.",
    )
    parser.add_argument(
        "--model",
        default=os.environ.get("AIP_STORAGE_URI"),
        help="model.h5, a directory holding it, or a checkpoints directory (default: $AIP_STORAGE_URI)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (a container passes 0.0.0.0)")
    parser.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("AIP_HTTP_PORT", "8080")),
        help="port (default: $AIP_HTTP_PORT, else 8080)",
    )
    parser.add_argument("--max-batch", type=int, default=64, help="most images in one forward pass (1: no batching)")
    parser.add_argument(
        "--batch-timeout-ms", type=float, default=2.0, help="how long a batch waits for more requests after its first"
    )
    parser.add_argument("--max-instances", type=int, default=128, help="most instances in one request")
    parser.add_argument("--max-body-bytes", type=int, default=8 << 20, help="largest request body")
    parser.add_argument("--access-log", action="store_true", help="log a line per request")
    config.add_flags(parser, config.OUTPUT_FLAGS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(build_parser(), argv, serve)


if __name__ == "__main__":
    sys.exit(main())
