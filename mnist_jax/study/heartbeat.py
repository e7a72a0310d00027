"""Which worker runs a trial, and whether it is still alive: the owner a trial records, and each worker's
heartbeat.

A worker is a `tune run` process (host, pid and the pid's start time, which
tells a reused pid apart). It records itself on each trial it claims (the
trial's system attribute `OWNER`) and writes its heartbeat, a study
attribute, `BEATS_PER_STALE` times per `--stale-after`. It is gone when its
process no longer exists on this host, or when its heartbeat is older than
`--stale-after` elsewhere; its trials are then handed back to the study.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time

OWNER = "mnist_jax:owner"  # a trial's system attribute: the worker that runs it
HEARTBEAT = "mnist_jax:heartbeat:"  # + the worker's host:pid, a study attribute
# A trial whose worker on another host has not been heard from for this long is taken over (tune run
# --stale-after: about what a preempted VM's replacement takes to come up).
STALE_AFTER_S = 120.0
BEATS_PER_STALE = 4


def _process_start(pid: int) -> str | None:
    """When process `pid` started, in clock ticks since boot (tells a reused pid apart); None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


@dataclasses.dataclass(frozen=True)
class Worker:
    """A `tune run` process, as recorded on the trials it runs."""

    host: str
    pid: int
    started: str | None

    @classmethod
    def me(cls) -> Worker:
        return cls(socket.gethostname(), os.getpid(), _process_start(os.getpid()))

    @property
    def beat_key(self) -> str:
        return f"{HEARTBEAT}{self.host}:{self.pid}"

    def gone(self, heartbeat: float, stale_after_s: float) -> bool:
        if self.host == socket.gethostname():
            return _process_start(self.pid) != self.started
        return time.time() - heartbeat > stale_after_s
