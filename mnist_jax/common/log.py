"""Console output: the project's one logger, as plain text or JSON lines, and quiet libraries.

Everything the project says goes through `logger`: information to stdout,
warnings and errors to stderr. `--log-format json` writes each message as one
JSON object with `severity` and `message`, which Cloud Logging (Vertex AI's
job logs) reads as a structured entry. Libraries (Orbax, gcsfs, JAX, asyncio)
log only with `--verbose`: without it a failure reaches the user as the one
line the project writes about it, not as the libraries' tracebacks.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings

FORMATS = ("text", "json")

logger = logging.getLogger("mnist_jax")


class _Formatter(logging.Formatter):
    def __init__(self, style: str) -> None:
        super().__init__()
        self.json = style == "json"

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if self.json:
            return json.dumps({"severity": record.levelname, "message": message})
        if record.levelno >= logging.ERROR:
            return f"error: {message}"
        if record.levelno >= logging.WARNING:
            return f"warning: {message}"
        return message


class _Handler(logging.Handler):
    """Information to stdout, warnings and errors to stderr; streams looked up at each write,
    so a redirected `sys.stdout` is honoured."""

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stdout if record.levelno < logging.WARNING else sys.stderr
        try:
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # a closed pipe must not turn into a second error
            self.handleError(record)


_handler = _Handler()
_handler.setFormatter(_Formatter("text"))
logger.addHandler(_handler)
logger.setLevel(logging.INFO)
logger.propagate = False


def _ignore_unraisable(unraisable: object) -> None:
    """Exceptions in finalisers (closed event loops of storage clients at exit) are not the user's."""


def configure(style: str = "text", *, verbose: bool = False, quiet: bool = False) -> None:
    """Sets the output format; `quiet` keeps only warnings and errors (processes other than 0)."""
    _handler.setFormatter(_Formatter(style))
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    library_level = logging.INFO if verbose else logging.CRITICAL + 1
    logging.getLogger().setLevel(library_level)
    try:
        from absl import logging as absl_logging  # Orbax logs through absl

        absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.FATAL)
    except ImportError:
        pass
    if not verbose:
        warnings.simplefilter("ignore")
        sys.unraisablehook = _ignore_unraisable
