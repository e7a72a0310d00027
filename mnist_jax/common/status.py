"""A trial's status in Vertex AI's words: the one vocabulary of the training loop, the study drivers and
`study.json`."""

from __future__ import annotations

import enum


class Status(enum.StrEnum):
    """A trial's state, as Vertex AI names it."""

    SUCCEEDED = "SUCCEEDED"
    STOPPED = "STOPPED"
    FAILED = "FAILED"
    ACTIVE = "ACTIVE"
    REQUESTED = "REQUESTED"
