"""Request batching: an asyncio-facing bounded queue in front of one model thread.

The model thread takes the oldest waiting request, waits up to ``max_wait_ms`` (from that request's arrival,
or from the end of the previous batch if later; a little longer while more requests are still being admitted)
for compatible requests, and runs up to ``max_batch_size`` of them in ONE ``engine.generate_batch`` call.
Compatible = same sampling parameters and same image/no-image shape; others wait for their own batch.
A cancelled or timed-out request is removed from the queue at once, and stops generating if already running.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from llamactl.server.engine import Engine, GenRequest, GenResult

log = logging.getLogger("llamactl.server.batching")


class QueueFull(Exception):
    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"the request queue is full; retry in {retry_after_s}s")
        self.retry_after_s = retry_after_s


class DeadlineExceeded(Exception):
    pass


class EngineFailure(Exception):
    pass


class Stopped(Exception):
    pass


@dataclass(eq=False)
class _Item:
    req: GenRequest
    resolve: Callable[[GenResult | BaseException], None]
    key: tuple[Any, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.key = (self.req.image is not None, self.req.params.batch_key)


class Batcher:
    def __init__(
        self,
        engine: Engine,
        *,
        max_batch_size: int,
        max_wait_ms: float,
        queue_limit: int,
        on_batch: Callable[[int], None] | None = None,
        on_batch_done: Callable[[float], None] | None = None,
        in_server: Callable[[], int] | None = None,
    ) -> None:
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.queue_limit = queue_limit
        self.on_batch = on_batch
        self.on_batch_done = on_batch_done
        # Requests inside the server (queued, running, or still being admitted: body, image decode, prompt).
        self.in_server = in_server
        self.admit_grace_s = max(self.max_wait_s, 0.5)
        self._cv = threading.Condition()
        self._queue: deque[_Item] = deque()
        self._running = 0
        self._stopping = False
        self._batch_s = 1.0  # moving average of batch duration, for Retry-After
        self._last_batch_end = 0.0  # monotonic time the previous batch finished
        self.batches = 0

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return self._running

    # -- event-loop side ---------------------------------------------------------------------------------

    def enqueue(self, req: GenRequest) -> Awaitable[GenResult]:
        """Queue ``req`` now (raising QueueFull or Stopped at once) and return an awaitable of its result.

        The awaitable raises DeadlineExceeded, EngineFailure or Stopped; cancelling it frees the place.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[GenResult] = loop.create_future()

        def settle(value: GenResult | BaseException) -> None:
            if fut.done():
                return
            if isinstance(value, BaseException):
                fut.set_exception(value)
            else:
                fut.set_result(value)

        def resolve(value: GenResult | BaseException) -> None:  # any thread
            if not loop.is_closed():
                loop.call_soon_threadsafe(settle, value)

        req.on_finish = resolve
        item = _Item(req, resolve)
        with self._cv:
            if self._stopping:
                raise Stopped("the server is shutting down")
            if len(self._queue) >= self.queue_limit:
                raise QueueFull(self.retry_after())
            self._queue.append(item)
            self._cv.notify_all()
        return self._wait(item, fut)

    async def submit(self, req: GenRequest) -> GenResult:
        return await self.enqueue(req)

    async def _wait(self, item: _Item, fut: asyncio.Future[GenResult]) -> GenResult:
        deadline = item.req.deadline
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            self._abandon(item)
            raise DeadlineExceeded("the request did not finish before its deadline") from None
        except asyncio.CancelledError:  # client went away
            self._abandon(item)
            raise
        finally:
            if fut.done() and not fut.cancelled():
                fut.exception()  # mark retrieved: no "exception never retrieved" noise

    def _abandon(self, item: _Item) -> None:
        item.req.cancel_event.set()  # stops it mid-generation if it already runs
        with self._cv:
            try:
                self._queue.remove(item)
            except ValueError:
                pass

    def retry_after(self) -> int:
        batches_ahead = math.ceil((len(self._queue) + self._running) / self.max_batch_size)
        return max(1, math.ceil(batches_ahead * self._batch_s))

    # -- model-thread side -------------------------------------------------------------------------------

    def run_forever(self) -> None:
        """Serve batches until ``stop()``. Runs on the model thread."""
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

    def stop(self) -> None:
        """Refuse new work, fail what is still queued, let the running batch finish."""
        with self._cv:
            self._stopping = True
            left = list(self._queue)
            self._queue.clear()
            self._cv.notify_all()
        for item in left:
            item.resolve(Stopped("the server shut down before this request ran"))

    def _next_batch(self) -> list[_Item] | None:
        with self._cv:
            while True:
                while not self._queue and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    return None
                first = self._queue[0]
                # The window starts no earlier than the end of the previous batch: clients whose answers
                # just came back resubmit a moment later and join this batch, instead of forming a second
                # group that alternates with the first for good (seen on an H100: mean batch 4 at
                # concurrency 8 with max_batch_size 8).
                fill_by = max(first.req.enqueued_at, self._last_batch_end) + self.max_wait_s
                # Past the window, a batch that is not full still waits (up to admit_grace_s) while requests
                # are being admitted: 32 image requests take the event loop longer to decode than a short
                # window, and one that misses the batch waits a whole batch (~10 s on an H100; measured in
                # bench/results/multi_gpu_run4: mean batch 24 of 32 at concurrency 32).
                hard_by = fill_by + self.admit_grace_s
                while not self._stopping and first in self._queue:
                    ready = sum(1 for it in self._queue if it.key == first.key)
                    now = time.monotonic()
                    if ready >= self.max_batch_size:
                        break
                    if now >= fill_by:
                        if now >= hard_by or self._admitting() == 0:
                            break
                        self._cv.wait(0.005)  # an admission ends with an enqueue (notify) or an error
                        continue
                    self._cv.wait(fill_by - now)
                if self._stopping:
                    return None
                batch: list[_Item] = []
                for it in list(self._queue):
                    if len(batch) >= self.max_batch_size:
                        break
                    if it.key != first.key:
                        continue
                    self._queue.remove(it)
                    if it.req.cancelled:
                        it.resolve(DeadlineExceeded("the request expired in the queue"))
                    else:
                        batch.append(it)
                if batch:
                    self._running = len(batch)
                    return batch

    def _admitting(self) -> int:
        """Requests in the server but not yet in the queue or a batch (0 when the server cannot say)."""
        if self.in_server is None:
            return 0
        return max(0, self.in_server() - len(self._queue) - self._running)

    def _run(self, batch: list[_Item]) -> None:
        # Counted when the batch starts: results are handed out row by row before generate returns.
        self.batches += 1
        if self.on_batch is not None:
            self.on_batch(len(batch))
        t0 = time.monotonic()
        try:
            self._generate(batch)
        finally:
            took = time.monotonic() - t0
            self._batch_s = 0.8 * self._batch_s + 0.2 * took
            if self.on_batch_done is not None:
                self.on_batch_done(took)
            with self._cv:
                self._running = 0
                self._last_batch_end = time.monotonic()

    def _generate(self, batch: list[_Item]) -> None:
        try:
            results = self.engine.generate_batch([it.req for it in batch])
        except Exception as exc:
            log.exception("generate failed for a batch of %d", len(batch))
            if len(batch) > 1:  # isolate a poisonous request instead of failing its neighbours
                for it in batch:
                    if not it.req.cancelled:
                        self._generate([it])
                return
            batch[0].resolve(EngineFailure(f"inference failed ({type(exc).__name__})"))
            return
        for it, res in zip(batch, results):
            it.resolve(res)
