"""Admission: the engine-agnostic front of every engine (queue limit -> 429, deadlines -> 504, drain).

The event loop hands a request to ``enqueue``, which refuses at once (``QueueFull`` with a Retry-After computed
from measured throughput and queue depth, or ``Stopped`` while draining) or adds it to the engine and returns an
awaitable of its result. A deadline or a client that goes away aborts the request inside the engine, which frees
its place (and its memory) at the next step boundary.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Awaitable

from llamactl.server.engine.protocol import EngineFailure, GenRequest, GenResult, ServingEngine, Stopped

__all__ = ["Admission", "DeadlineExceeded", "EngineFailure", "QueueFull", "Stopped"]


class QueueFull(Exception):
    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"the request queue is full; retry in {retry_after_s}s")
        self.retry_after_s = retry_after_s


class DeadlineExceeded(Exception):
    pass


class Admission:
    def __init__(self, engine: ServingEngine, *, queue_limit: int) -> None:
        self.engine = engine
        self.queue_limit = queue_limit
        self._lock = threading.Lock()
        self._stopping = False
        # Completed requests per second (moving average over completions), for Retry-After.
        self._rate = 0.0
        self._last_done: float | None = None

    @property
    def queued(self) -> int:
        return self.engine.waiting

    @property
    def running(self) -> int:
        return self.engine.running

    # -- event-loop side ---------------------------------------------------------------------------------

    def enqueue(self, req: GenRequest) -> Awaitable[GenResult]:
        """Add ``req`` now (raising QueueFull or Stopped at once) and return an awaitable of its result.

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
            if isinstance(value, GenResult):
                self._completed()
            if not loop.is_closed():
                loop.call_soon_threadsafe(settle, value)

        req.on_finish = resolve
        with self._lock:
            if self._stopping:
                raise Stopped("the server is shutting down")
            if self.engine.waiting >= self.queue_limit:
                raise QueueFull(self.retry_after())
            self.engine.add(req)
        return self._wait(req, fut)

    async def submit(self, req: GenRequest) -> GenResult:
        return await self.enqueue(req)

    async def _wait(self, req: GenRequest, fut: asyncio.Future[GenResult]) -> GenResult:
        deadline = req.deadline
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            self._abandon(req)
            raise DeadlineExceeded("the request did not finish before its deadline") from None
        except asyncio.CancelledError:  # client went away
            self._abandon(req)
            raise
        finally:
            if fut.done() and not fut.cancelled():
                fut.exception()  # mark retrieved: no "exception never retrieved" noise

    def _abandon(self, req: GenRequest) -> None:
        req.cancel_event.set()  # stops it mid-generation if it already runs
        self.engine.abort(req)

    def _completed(self) -> None:
        now = time.monotonic()
        with self._lock:
            if self._last_done is not None:
                gap = max(now - self._last_done, 1e-3)
                self._rate = 0.9 * self._rate + 0.1 * (1.0 / gap) if self._rate else 1.0 / gap
            self._last_done = now

    def retry_after(self) -> int:
        """Seconds until the requests ahead are likely done: queue depth over measured completions per second."""
        ahead = self.engine.waiting + self.engine.running
        rate = self._rate if self._rate > 0 else 1.0
        return max(1, min(600, math.ceil(ahead / rate)))

    # -- lifetime ----------------------------------------------------------------------------------------

    def run_forever(self) -> None:
        """Run the engine's step loop until ``stop()`` (model thread)."""
        self.engine.run_forever()

    def stop(self) -> None:
        """Refuse new work; the engine fails what is still waiting and lets running requests finish."""
        with self._lock:
            self._stopping = True
        self.engine.stop()
