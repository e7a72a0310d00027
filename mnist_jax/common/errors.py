"""The project's user-facing error types.

Each entry point catches `MnistJaxError` and hands it to `report`, which logs
its message as one line, so a user sees what to fix instead of a traceback.
"""

from mnist_jax.common.log import logger

EXIT_STATUS = 2  # what every command-line entry point returns for a user-facing error


def report(error: object) -> int:
    """Logs `error` as one line (`error: ...` on stderr in text format); returns the exit status to use."""
    logger.error(" ".join(str(error).split()))
    return EXIT_STATUS


class MnistJaxError(Exception):
    """Base class: an error whose message is meant for the user."""


class ConfigError(MnistJaxError, ValueError):
    """A flag or environment setting is invalid."""


class DataError(MnistJaxError, ValueError):
    """A dataset file is missing, unreadable, unsafe or malformed."""


class CheckpointError(MnistJaxError):
    """A checkpoint cannot be used to continue this job."""


class StorageError(MnistJaxError):
    """Reading or writing a file (local or gs://) failed for good."""
