"""The ordered background writer: every file and storage write of a training loop, off its critical path.

Modelled on CLU's `AsyncWriter`: one thread per process runs the submitted
writes in the order they were submitted, while the device trains the next
epoch. A write that fails is not lost in the thread: `check` (called at every
epoch end) and `flush` re-raise the first failure on the caller's thread, so a
full disk or an unwritable job dir still stops the job within an epoch with its
one-line error. After a failure the writes queued behind it are skipped: they
may depend on it (a trial's `trial_done` after its export).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor


class Writer:
    """One thread that runs submitted writes in order; failures come back through `check` and `flush`."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="writer")
        self._pending: list[Future] = []
        self._failure: BaseException | None = None
        self._lock = threading.Lock()

    def submit(self, write: Callable[[], object]) -> None:
        self.check()
        self._pending.append(self._pool.submit(self._run, write))

    def _run(self, write: Callable[[], object]) -> None:
        with self._lock:
            if self._failure is not None:
                return  # what follows a failed write may depend on it
        try:
            write()
        except BaseException as e:
            with self._lock:
                if self._failure is None:
                    self._failure = e

    def check(self) -> None:
        """Re-raises the first failed write, without waiting for the ones in flight."""
        self._pending = [f for f in self._pending if not f.done()]
        with self._lock:
            failure = self._failure
        if failure is not None:
            raise failure

    def flush(self) -> None:
        """Waits for every submitted write; re-raises the first failure."""
        for future in self._pending:
            future.result()
        self._pending = []
        self.check()

    def close(self) -> None:
        """Finishes the submitted writes and stops the thread (failures are left to `check`/`flush`)."""
        self._pool.shutdown(wait=True)
