"""Turning sampled token ids into what clients see, off the step loop.

After a decode step the model thread only records each row's token and decides whether the row goes on (an
end-of-sequence token, its token limit, a cancel): a few microseconds a row. Detokenizing, streaming the text
pieces, building the final result and observing latency metrics happen here, on one thread fed in step order,
while the GPU already runs the next step. At 32 rows that work was ~2 ms of every ~16 ms step on the model thread
(vLLM moves it out of the engine loop for the same reason). One FIFO thread keeps each request's pieces and its
end in order.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger("llamactl.server.engine")

Job = Callable[[], None]


class OutputWorker:
    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="engine-output", daemon=True)
        self._thread.start()
        self._idle = threading.Event()
        self._idle.set()
        self._pending = 0
        self._lock = threading.Lock()

    def submit(self, job: Job) -> None:
        with self._lock:
            self._pending += 1
            self._idle.clear()
        self._queue.put(job)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every submitted job ran (tests, shutdown)."""
        return self._idle.wait(timeout)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                job()
            except Exception:  # a failing client callback must not stop every other stream
                log.exception("engine output callback failed")
            with self._lock:
                self._pending -= 1
                if not self._pending:
                    self._idle.set()


def run_all(jobs: list[Job]) -> Job:
    """One job for a whole step (one queue put per step, not per row)."""

    def run() -> None:
        for job in jobs:
            try:
                job()
            except Exception:  # as above, per row
                log.exception("engine output callback failed")

    return run
