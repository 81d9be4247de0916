"""``SharedJobs``: what the server holds when it has a Redis URL (the jobs API's store and this instance's
consumer). Every Redis failure reaches the routes as ``StateUnavailable`` with a plain message."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from redis import exceptions as rx

from llamactl.state.client import StateUnavailable, connect, is_down, unavailable, where
from llamactl.state.consumer import JobConsumer, Runner
from llamactl.state.jobs import JobRecords


class SharedJobs:
    def __init__(
        self,
        url: str,
        *,
        instance: str,
        ttl_s: float,
        slots: int,
        claim_idle_s: float,
        max_deliveries: int,
        accepting: Callable[[], bool],
        room: Callable[[], bool] = lambda: True,
    ) -> None:
        self.url = url
        self.redis = connect(url)
        self.records = JobRecords(self.redis, ttl_s)
        self._consumer_args: dict[str, Any] = {
            "name": instance, "slots": slots, "claim_idle_s": claim_idle_s,
            "max_deliveries": max_deliveries, "accepting": accepting, "room": room,
        }
        self.consumer: JobConsumer | None = None

    @property
    def where(self) -> str:
        return where(self.url)

    @property
    def active(self) -> int:
        return 0 if self.consumer is None else self.consumer.active

    def start(self, run: Runner) -> None:
        self.consumer = JobConsumer(self.records, run, **self._consumer_args)
        self.consumer.start()

    async def stop(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()
        await self.redis.aclose()

    async def submit(self, request: dict[str, Any]) -> str:
        try:
            return await self.records.submit(request)  # the consumers create the group when missing
        except (rx.RedisError, OSError) as exc:
            raise self._unavailable(exc) from None

    async def get(self, job_id: str) -> dict[str, Any] | None:
        try:
            return await self.records.get(job_id)
        except (rx.RedisError, OSError) as exc:
            raise self._unavailable(exc) from None

    def _unavailable(self, exc: BaseException) -> StateUnavailable:
        if not is_down(exc):
            raise exc
        return unavailable(exc, self.url)
