"""Preemption and Ctrl-C: SIGTERM (what cloud schedulers send before they stop a VM) and SIGINT as a request
to save and stop, not a kill.

While a `PreemptionGuard` is active, SIGTERM or a first SIGINT only sets
`requested`; the training loop finishes the epoch in flight, saves every lane
and raises `Preempted` (exit status 143 after SIGTERM, 130 after Ctrl-C), and
the tuning driver forwards the request to its trials. A second Ctrl-C raises
KeyboardInterrupt at once. Kept free of JAX, so the tuning driver can use it
without starting a backend.
"""

from __future__ import annotations

import signal
import types
from typing import Any

from mnist_jax.common.errors import MnistJaxError

EXIT_STATUS = 143  # 128 + SIGTERM, as if the signal had ended the process
INTERRUPTED_STATUS = 130  # 128 + SIGINT
_NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C"}
_STATUS = {signal.SIGTERM: EXIT_STATUS, signal.SIGINT: INTERRUPTED_STATUS}


class Preempted(MnistJaxError):
    """SIGTERM or Ctrl-C arrived; the work in hand was saved and the same command continues it."""

    def __init__(self, message: str, signum: int = signal.SIGTERM) -> None:
        super().__init__(f"{_NAMES[signum]}: {message}")
        self.status = _STATUS[signum]
        self.verb = "preempted" if signum == signal.SIGTERM else "interrupted"


class PreemptionGuard:
    """While active, SIGTERM and a first SIGINT set `requested` (and `signum`) instead of ending the process."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int = signal.SIGTERM
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop at once
        if not self.requested:
            self.requested, self.signum = True, signum

    def __enter__(self) -> PreemptionGuard:
        for signum in _NAMES:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
