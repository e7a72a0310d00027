"""The ordered background writer: every file and storage write of a training loop, off its critical path.

Modelled on CLU's `AsyncWriter`: one thread per training loop runs the
submitted writes in the order they were submitted, while the device trains the
next epoch; drawings (`curves.png`) run on a second thread, as nothing waits
for them. A write that fails is not lost in the thread: `check` (called at every
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
    """A thread that runs submitted writes in order, one for drawings; failures come back through `check`/`flush`."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="writer")
        # Drawings hold the GIL while saves mostly wait on I/O: a thread of their own lets the two overlap.
        self._drawer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="drawer")
        self._pending: list[Future] = []
        self._failure: BaseException | None = None
        self._lock = threading.Lock()

    def submit(self, write: Callable[[], object]) -> None:
        self.check()
        self._queue(self._pool, write)

    def draw(self, drawing: Callable[[], object]) -> None:
        """Runs `drawing` on the drawing thread, in order with other drawings; nothing waits for it but `flush`
        (any thread may call it: the writer hands its trials' final curves over)."""
        self._queue(self._drawer, drawing)

    def _queue(self, thread: ThreadPoolExecutor, write: Callable[[], object]) -> None:
        future = thread.submit(self._run, write)
        with self._lock:
            self._pending.append(future)

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
        with self._lock:
            self._pending = [f for f in self._pending if not f.done()]
            failure = self._failure
        if failure is not None:
            raise failure

    def flush(self) -> None:
        """Waits for every submitted write; re-raises the first failure."""
        while True:
            with self._lock:
                pending = [f for f in self._pending if not f.done()]
            if not pending:
                break
            for future in pending:  # a write may hand a drawing over while we wait
                future.result()
        self.check()

    def close(self) -> None:
        """Finishes the submitted writes and stops the threads (failures are left to `check`/`flush`)."""
        self._pool.shutdown(wait=True)
        self._drawer.shutdown(wait=True)
