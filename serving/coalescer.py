"""Request coalescing for the model deployments: one model call at a time, each taking what waits by then."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter


class Coalescer:
    """One `run(items) -> outputs` call at a time; each call takes up to `limit` of the items waiting by then.

    Why: `@serve.batch` forms the next batch while one runs and keeps it until that one is done (Ray forms
    batches before taking its max_concurrent_batches semaphore). Requests that arrive during a long call thus sit
    in many small batches, each waiting its turn: under load the formed batches stayed near 1 request. So the
    batch handlers here only hand their requests over (their `max_concurrent_batches` is high on purpose), and
    whenever the work is free, the next call takes what is waiting: oldest first and, with `key`, those that share
    the oldest's key. One handler at a time holds `lock` (FIFO) and runs calls until its own items are done.
    """

    def __init__(self, run, limit: int, key=None, dropped=None):
        """`dropped(item)`: True for an item nobody waits for any more (a cancelled request); it leaves the queue
        with the answer None instead of being run."""
        self.run, self.limit, self.key, self.dropped = run, limit, key, dropped
        self.waiting: list[tuple[object, asyncio.Future]] = []
        self.lock: asyncio.Lock | None = None  # made on first use, on the replica's event loop
        self.sizes: Counter = Counter()  # items per run call → calls

    async def __call__(self, items: list) -> list:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        self.waiting.extend(zip(items, futures))
        if self.lock is None:
            self.lock = asyncio.Lock()
        async with self.lock:
            while not all(future.done() for future in futures):
                await self._run_next()
        return [future.result() for future in futures]

    def _take(self) -> list[tuple[object, asyncio.Future]]:
        if self.dropped is not None:
            for item, future in self.waiting:
                if self.dropped(item) and not future.done():
                    future.set_result(None)
            self.waiting = [(item, future) for item, future in self.waiting if not future.done()]
        if not self.waiting:
            return []
        key = self.key(self.waiting[0][0]) if self.key else None
        taken, kept = [], []
        for entry in self.waiting:
            fits = len(taken) < self.limit and (self.key is None or self.key(entry[0]) == key)
            (taken if fits else kept).append(entry)
        self.waiting = kept
        return taken

    async def _run_next(self) -> None:
        taken = self._take()
        if not taken:
            return
        try:
            outputs = await self.run([item for item, _ in taken])
        except BaseException as exc:  # the items taken with it must not wait forever
            for _, future in taken:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else RuntimeError("interrupted"))
            if not isinstance(exc, Exception):
                raise
            return
        self.sizes[len(taken)] += 1
        for (_, future), output in zip(taken, outputs):
            future.set_result(output)


def no_concurrent_batches_warning(record: logging.LogRecord) -> bool:
    """Serve warns when max_batch_size × max_concurrent_batches exceeds max_ongoing_requests; with Coalescer that
    is intended (a formed batch only hands its requests over), so this warning is dropped."""
    return "max_concurrent_batches" not in record.getMessage()


def histogram(sizes: Counter) -> dict[str, int]:
    """Items per call → calls, with string keys (JSON)."""
    return {str(size): count for size, count in sorted(sizes.items())}
