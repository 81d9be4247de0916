"""``Batcher``: admission in front of the ``hf`` engine's windowed static batches, as one object.

Kept for callers that drive a model-level ``Engine`` directly (tests, benches): it is exactly what the server
builds for ``--engine hf`` (``Admission`` over ``StaticBatches``), with the static scheduler's knobs reachable.
"""

from __future__ import annotations

from collections.abc import Callable

from llamactl.server.admission import Admission, DeadlineExceeded, EngineFailure, QueueFull, Stopped
from llamactl.server.engine.protocol import Engine
from llamactl.server.engine.static import StaticBatches

__all__ = ["Batcher", "DeadlineExceeded", "EngineFailure", "QueueFull", "Stopped"]


class Batcher(Admission):
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
        self.static = StaticBatches(
            engine,
            max_batch_size=max_batch_size,
            max_wait_ms=max_wait_ms,
            on_batch=on_batch,
            on_batch_done=on_batch_done,
            in_server=in_server,
        )
        super().__init__(self.static, queue_limit=queue_limit)

    @property
    def batches(self) -> int:
        return self.static.batches

    @property
    def in_server(self) -> Callable[[], int] | None:
        return self.static.in_server

    @in_server.setter
    def in_server(self, value: Callable[[], int] | None) -> None:
        self.static.in_server = value

    @property
    def admit_grace_s(self) -> float:
        return self.static.admit_grace_s

    @admit_grace_s.setter
    def admit_grace_s(self, value: float) -> None:
        self.static.admit_grace_s = value
