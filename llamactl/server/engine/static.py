"""The ``hf`` serving engine: windowed static batches over the transformers engine (one ``generate`` per batch).

The model thread takes the oldest waiting request, waits up to ``max_wait_ms`` (from that request's arrival,
or from the end of the previous batch if later; a little longer while more requests are still being admitted)
for compatible requests, and runs up to ``max_batch_size`` of them in ONE ``engine.generate_batch`` call.
Compatible = same sampling parameters and same image/no-image shape; others wait for their own batch.
A request that arrives while a batch runs waits for the whole batch: the continuous engine does not.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from llamactl.server.engine.protocol import (
    Engine,
    EngineFailure,
    EngineState,
    GenRequest,
    GenResult,
    Stopped,
)
from llamactl.server.liveness import Liveness

log = logging.getLogger("llamactl.server.batching")


def _key(req: GenRequest) -> tuple[Any, ...]:
    return (req.image is not None, req.params.batch_key)


def _resolve(req: GenRequest, value: GenResult | BaseException) -> None:
    if req.on_finish is not None:
        req.on_finish(value)


class StaticBatches:
    name = "hf"

    def __init__(
        self,
        engine: Engine,
        *,
        max_batch_size: int,
        max_wait_ms: float,
        on_batch: Callable[[int], None] | None = None,
        on_batch_done: Callable[[float], None] | None = None,
        in_server: Callable[[], int] | None = None,
    ) -> None:
        self.engine = engine
        self.model_name = engine.model_name
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.on_batch = on_batch
        self.on_batch_done = on_batch_done
        # Requests inside the server (queued, running, or still being admitted: body, image decode, prompt).
        self.in_server = in_server
        self.admit_grace_s = max(self.max_wait_s, 0.5)
        self._cv = threading.Condition()
        self._queue: deque[GenRequest] = deque()
        self._running = 0
        self._stopping = False
        self._last_batch_end = 0.0  # monotonic time the previous batch finished
        self.liveness: Liveness | None = None  # set by the server: step progress for stall detection
        self.batches = 0
        if hasattr(engine, "progress_hook"):
            engine.progress_hook = self.note_progress

    # -- the ServingEngine surface -----------------------------------------------------------------------

    @property
    def state(self) -> EngineState:
        return self.engine.state

    @property
    def error(self) -> str | None:
        return self.engine.error

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return self._running

    def note_progress(self) -> None:
        """Called per decode step by the HF engine's row tracker (step progress for stall detection)."""
        if self.liveness is not None:
            self.liveness.step_completed()

    def start(self) -> None:
        self.engine.load()
        self.engine.warmup()

    def prepare(self, req: GenRequest) -> None:
        """Refuse a request longer than the context before it queues (the processor runs per batch later)."""
        check = getattr(self.engine, "check_length", None)
        if check is not None:
            check(req)

    def add(self, req: GenRequest) -> None:
        with self._cv:
            if self._stopping:
                raise Stopped("the server is shutting down")
            if self.liveness is not None:
                self.liveness.work_arrived(was_idle=not self._queue and self._running == 0)
            req.queued_at = time.monotonic()
            self._queue.append(req)
            self._cv.notify_all()

    def abort(self, req: GenRequest) -> None:
        req.cancel_event.set()
        with self._cv:
            try:
                self._queue.remove(req)
            except ValueError:
                pass

    def render_prompt(self, messages: list[dict[str, Any]]) -> str:
        return self.engine.render_prompt(messages)

    def gpu_memory(self) -> tuple[int, int] | None:
        return self.engine.gpu_memory()

    def describe(self) -> dict[str, Any]:
        inner = self.engine.describe() if hasattr(self.engine, "describe") else {}
        return {"name": self.name, **inner, "max_batch_size": self.max_batch_size}

    def close(self) -> None:
        self.engine.close()

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
        for req in left:
            _resolve(req, Stopped("the server shut down before this request ran"))

    def _next_batch(self) -> list[GenRequest] | None:
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
                fill_by = max(first.enqueued_at, self._last_batch_end) + self.max_wait_s
                # Past the window, a batch that is not full still waits (up to admit_grace_s) while requests
                # are being admitted: 32 image requests take the event loop longer to decode than a short
                # window, and one that misses the batch waits a whole batch (~10 s on an H100; measured in
                # bench/results/multi_gpu_run4: mean batch 24 of 32 at concurrency 32).
                hard_by = fill_by + self.admit_grace_s
                while not self._stopping and first in self._queue:
                    ready = sum(1 for r in self._queue if _key(r) == _key(first))
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
                batch: list[GenRequest] = []
                for r in list(self._queue):
                    if len(batch) >= self.max_batch_size:
                        break
                    if _key(r) != _key(first):
                        continue
                    self._queue.remove(r)
                    if r.cancelled:
                        from llamactl.server.admission import DeadlineExceeded

                        _resolve(r, DeadlineExceeded("the request expired in the queue"))
                    else:
                        batch.append(r)
                if batch:
                    self._running = len(batch)
                    taken = time.monotonic()
                    for r in batch:
                        r.taken_at = taken
                    return batch

    def _admitting(self) -> int:
        """Requests in the server but not yet in the queue or a batch (0 when the server cannot say)."""
        if self.in_server is None:
            return 0
        return max(0, self.in_server() - len(self._queue) - self._running)

    def _run(self, batch: list[GenRequest]) -> None:
        # Counted when the batch starts: results are handed out row by row before generate returns.
        self.batches += 1
        if self.on_batch is not None:
            self.on_batch(len(batch))
        t0 = time.monotonic()
        try:
            self._generate(batch)
        finally:
            took = time.monotonic() - t0
            if self.on_batch_done is not None:
                self.on_batch_done(took)
            with self._cv:
                self._running = 0
                self._last_batch_end = time.monotonic()

    def _generate(self, batch: list[GenRequest]) -> None:
        # The HF engine's row tracker reports each row the moment it is done; rows it did not report (an engine
        # that only returns results) are reported from the returned list. Each request is reported once.
        for r in batch:
            _report_once(r)
        try:
            results = self.engine.generate_batch(batch)
        except Exception as exc:
            if _is_fatal(exc):
                raise
            log.exception("generate failed for a batch of %d", len(batch))
            if len(batch) > 1:  # isolate a poisonous request instead of failing its neighbours
                for r in batch:
                    if not r.cancelled:
                        self._generate([r])
                return
            _resolve(batch[0], EngineFailure(f"inference failed ({type(exc).__name__})"))
            return
        for r, res in zip(batch, results):
            _resolve(r, res)


def _report_once(req: GenRequest) -> None:
    callback = req.on_finish
    if callback is None or getattr(callback, "_once", False):
        return
    done = [False]

    def once(value: GenResult | BaseException) -> None:
        if not done[0]:
            done[0] = True
            callback(value)

    once._once = True  # type: ignore[attr-defined]
    req.on_finish = once


def _is_fatal(exc: BaseException) -> bool:
    from llamactl.server.liveness import is_fatal_cuda_error

    return is_fatal_cuda_error(exc)
