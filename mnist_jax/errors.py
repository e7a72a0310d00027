"""The project's user-facing error types.

Each entry point catches `MnistJaxError` and prints its message as one line, so
a user sees what to fix instead of a traceback.
"""


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
