"""Preemption: SIGTERM (what cloud schedulers send before they stop a VM) as a request, not a kill.

While a `PreemptionGuard` is active, SIGTERM only sets `requested`; the training
loop finishes the epoch in flight, saves every lane and raises `Preempted`, and
the tuning driver forwards the request to its trials. Kept free of JAX, so the
tuning driver can use it without starting a backend.
"""

from __future__ import annotations

import signal
import types
from typing import Any

from mnist_jax.errors import MnistJaxError

EXIT_STATUS = 143  # 128 + SIGTERM, as if the signal had ended the process


class Preempted(MnistJaxError):
    """SIGTERM arrived; the work in hand was saved and the same command continues it."""


class PreemptionGuard:
    """While active, SIGTERM sets `requested` instead of killing the process."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        self.requested = True

    def __enter__(self) -> PreemptionGuard:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGTERM, self._previous)
