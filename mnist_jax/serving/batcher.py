"""Dynamic batching: requests waiting at the same time are gathered, up to `max_batch` images, run as one
forward pass on a thread of its own, and split back to their callers.

A batch waits (at most `batch_timeout_ms`) only for requests that have already
arrived and are still being parsed, so a lone request is answered at once.
Batches are padded to power-of-two sizes, all compiled by `warm_up` before the
server reports healthy, so nothing compiles while serving.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
from collections.abc import Callable

import numpy as np

from mnist_jax.data.dataset import IMAGE_PIXELS

Forward = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request and one forward pass may hold (the server's flags)."""

    max_batch: int
    batch_timeout_ms: float
    max_instances: int
    max_body_bytes: int


def bucket_sizes(largest: int) -> list[int]:
    """Powers of two up to the first one >= `largest`: the only batch shapes ever compiled."""
    sizes = [1]
    while sizes[-1] < largest:
        sizes.append(sizes[-1] * 2)
    return sizes


class Batcher:
    """Gathers concurrent requests into padded batches for one forward pass each."""

    def __init__(self, forward: Forward, limits: Limits) -> None:
        self.forward = forward
        self.max_batch = limits.max_batch
        self.timeout_s = limits.batch_timeout_ms / 1000
        self.buckets = bucket_sizes(max(limits.max_batch, limits.max_instances))
        self._queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future]] = asyncio.Queue()
        self._held: tuple[np.ndarray, asyncio.Future] | None = None  # didn't fit the last batch
        self.arriving = 0  # requests received but not yet queued (being read and parsed)
        # One thread runs the forward passes, so the event loop keeps accepting requests meanwhile.
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")

    def warm_up(self) -> None:
        """Compiles every bucket (call before reporting healthy)."""
        for size in self.buckets:
            self.forward(np.zeros((size, IMAGE_PIXELS), np.float32))

    def padded_forward(self, images: np.ndarray) -> np.ndarray:
        size = next(b for b in self.buckets if b >= len(images))
        padded = np.zeros((size, images.shape[1]), np.float32)
        padded[: len(images)] = images
        return self.forward(padded)[: len(images)]

    async def predict(self, images: np.ndarray) -> np.ndarray:
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((images, future))
        return await future

    async def _next_item(self, timeout: float | None) -> tuple[np.ndarray, asyncio.Future] | None:
        if self._held is not None:
            item, self._held = self._held, None
            return item
        if timeout is None:
            return await self._queue.get()
        if not self._queue.empty():
            return self._queue.get_nowait()
        if timeout <= 0 or self.arriving == 0:  # nobody else is on the way: don't wait
            return None
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._next_item(None)
            batch, count = [first], len(first[0])
            deadline = loop.time() + self.timeout_s
            while count < self.max_batch:
                item = await self._next_item(deadline - loop.time())
                if item is None:
                    break
                if count + len(item[0]) > self.max_batch:
                    self._held = item
                    break
                batch.append(item)
                count += len(item[0])
            images = np.concatenate([images for images, _ in batch])
            try:
                probabilities = await loop.run_in_executor(self._executor, self.padded_forward, images)
            except Exception as e:  # a server fault: every caller of this batch gets a 500
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            start = 0
            for request_images, future in batch:
                if not future.done():  # a caller may have gone away
                    future.set_result(probabilities[start : start + len(request_images)])
                start += len(request_images)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
