"""One instance's consumer of the jobs stream: it claims a job only when it has a free slot.

Each loop turn, with a slot free, the server ready and room in its admission queue: first reclaim one entry another consumer left
pending longer than ``claim_idle_s`` (XAUTOCLAIM: that consumer died or hung), else read one new entry
(XREADGROUP, blocking briefly). While a job runs, its entry's idle time is reset every ``claim_idle_s / 3``
(XCLAIM JUSTID, which does not count as a delivery), so a long job is never taken from a live instance.

Failures: a request at fault (bad image, too many tokens) fails the job at once; other failures leave the
entry pending for another delivery, and a job delivered ``max_deliveries`` times without finishing (failures,
or instances that died running it) ends ``failed`` with the last reason. Entries handed back while draining
(claimed, no output yet) are made claimable at once and do not count.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from redis import exceptions as rx

from llamactl.state.client import is_down
from llamactl.state.jobs import GROUP, STREAM, JobFailed, JobRecords

log = logging.getLogger("llamactl.state")

# run(request, on_start) -> the job's result; on_start() is called once the job produces output.
Runner = Callable[[dict[str, Any], Callable[[], None]], Awaitable[dict[str, Any]]]
BLOCK_MS = 500  # longest wait for a new entry: also how quickly a drain stops claiming
DOWN_BACKOFF_S = 1.0


@dataclass
class _Claim:
    job_id: str
    entry_id: str
    started: bool = False
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class JobConsumer:
    def __init__(
        self,
        records: JobRecords,
        run: Runner,
        *,
        name: str,
        slots: int,
        claim_idle_s: float,
        max_deliveries: int,
        accepting: Callable[[], bool],
        room: Callable[[], bool] = lambda: True,
    ) -> None:
        self.records, self.run, self.room = records, run, room
        self.name = f"{name or 'server'}-{uuid.uuid4().hex[:8]}"  # unique per process
        self.slots, self.max_deliveries, self.accepting = slots, max_deliveries, accepting
        self.claim_idle_ms = max(1, int(claim_idle_s * 1000))
        self.claims: dict[str, _Claim] = {}
        self.redis_up = True
        self._freed = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def active(self) -> int:
        return len(self.claims)

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._loop(), name="llamactl-jobs")

    async def stop(self) -> None:
        """Stop claiming and hand back every job still held (the drain already let started ones finish)."""
        self._stopping = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        await self._give_back(started_too=True)

    async def _loop(self) -> None:
        while not self._stopping:
            if not self.accepting():
                await self._give_back(started_too=False)
                await self._wait_freed()
                continue
            if self.active >= self.slots or not self.room():
                await self._wait_freed()
                continue
            try:
                await self._claim_one()
                self._set_up(True)
            except rx.ResponseError as exc:
                if "NOGROUP" in str(exc):  # Redis lost its data (no persistence) or the group was never made
                    await self._guard(self.records.ensure_group())
                    continue
                if not is_down(exc):
                    raise
                self._set_up(False, exc)
                await asyncio.sleep(DOWN_BACKOFF_S)  # a retry interval, not synchronisation
            except Exception as exc:
                if not is_down(exc):
                    raise
                self._set_up(False, exc)
                await asyncio.sleep(DOWN_BACKOFF_S)

    def _set_up(self, up: bool, exc: BaseException | None = None) -> None:
        if up != self.redis_up:
            if up:
                log.info("jobs: Redis reachable again")
            else:
                log.warning("jobs: Redis unreachable (%s); retrying every %gs", type(exc).__name__,
                            DOWN_BACKOFF_S)
        self.redis_up = up

    async def _wait_freed(self) -> None:
        self._freed.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._freed.wait(), BLOCK_MS / 1000)

    async def _claim_one(self) -> None:
        redis = self.records.redis
        _, entries, deleted = await redis.xautoclaim(STREAM, GROUP, self.name, self.claim_idle_ms, "0-0",
                                                     count=1)
        if deleted:  # entries deleted from the stream while pending: nothing to run
            await redis.xack(STREAM, GROUP, *deleted)
        if entries:
            entry_id, fields = entries[0]
            pending = await redis.xpending_range(STREAM, GROUP, entry_id, entry_id, 1)
            deliveries = int(pending[0]["times_delivered"]) if pending else 1
            await self._take(entry_id, fields, deliveries)
            return
        read: Any = await redis.xreadgroup(GROUP, self.name, {STREAM: ">"}, count=1, block=BLOCK_MS)
        for _stream, items in read or []:
            for entry_id, fields in items:
                await self._take(entry_id, fields, 1)

    async def _take(self, entry_id: str, fields: dict[str, str], deliveries: int) -> None:
        job_id = fields.get("job", "")
        record = await self.records.fields(job_id)
        if record.get("status") in ("succeeded", "failed") or not record:
            await self.records.redis.xack(STREAM, GROUP, entry_id)  # ended (or expired) already
            await self.records.redis.xdel(STREAM, entry_id)
            return
        failed_deliveries = deliveries - 1 - int(record.get("gave_back", "0"))
        if failed_deliveries >= self.max_deliveries:
            last = record.get("last_error") or "the instance running it stopped before it finished"
            message = f"gave up after {failed_deliveries} failed deliveries; the last: {last}"
            await self.records.finish(job_id, entry_id, "failed",
                                      {"message": message, "type": "job_failed", "status": 500})
            log.warning("jobs: %s failed: %s", job_id, message)
            return
        try:
            request = json.loads(fields["request"])
        except (KeyError, ValueError):
            await self.records.finish(job_id, entry_id, "failed", {
                "message": "the stored request is not readable", "type": "internal", "status": 500})
            return
        await self.records.running(job_id, self.name)
        claim = _Claim(job_id, entry_id)
        self.claims[entry_id] = claim
        claim.task = asyncio.get_running_loop().create_task(self._run(claim, request))

    async def _run(self, claim: _Claim, request: dict[str, Any]) -> None:
        def on_start() -> None:  # may be called on the model thread: a plain attribute write
            claim.started = True

        heartbeat = asyncio.get_running_loop().create_task(self._heartbeat(claim))
        try:
            try:
                result = await self.run(request, on_start)
            except JobFailed as exc:
                if exc.retry:
                    await self._guard(self.records.note_failure(claim.job_id, exc.error.get("message", "")))
                    # claimable again at once (by any instance); the delivery counts
                    await self._guard(self._make_claimable(claim))
                else:
                    await self._finish(claim, "failed", exc.error)
                return
            claim.started = True
            await self._finish(claim, "succeeded", result)
        finally:
            heartbeat.cancel()
            self.claims.pop(claim.entry_id, None)
            self._freed.set()

    async def _finish(self, claim: _Claim, status: Any, payload: dict[str, Any]) -> None:
        """Write the outcome, waiting out a Redis outage for up to a claim timeout; past that the entry stays
        pending and another instance reruns the job (nothing is lost, the work is repeated)."""
        deadline = asyncio.get_running_loop().time() + self.claim_idle_ms / 1000
        while True:
            try:
                await self.records.finish(claim.job_id, claim.entry_id, status, payload)
                return
            except Exception as exc:
                if not is_down(exc):
                    raise
                if asyncio.get_running_loop().time() > deadline:
                    log.warning("jobs: could not record the end of %s (Redis unreachable); it will be rerun",
                                claim.job_id)
                    return
                await asyncio.sleep(DOWN_BACKOFF_S / 4)

    async def _heartbeat(self, claim: _Claim) -> None:
        while True:
            await asyncio.sleep(self.claim_idle_ms / 3000)
            await self._guard(self._touch(claim))

    async def _touch(self, claim: _Claim) -> None:
        redis = self.records.redis
        mine = await redis.xpending_range(STREAM, GROUP, claim.entry_id, claim.entry_id, 1,
                                          consumername=self.name)
        if mine:  # not when another instance reclaimed it meanwhile (this one was presumed dead)
            await redis.xclaim(STREAM, GROUP, self.name, 0, [claim.entry_id], justid=True)

    async def _make_claimable(self, claim: _Claim) -> None:
        """Keep the entry but mark it idle past the claim timeout, so the next XAUTOCLAIM anywhere takes it."""
        await self.records.redis.xclaim(STREAM, GROUP, self.name, 0, [claim.entry_id],
                                        idle=self.claim_idle_ms * 2, justid=True)

    async def _give_back(self, *, started_too: bool) -> None:
        for claim in list(self.claims.values()):
            if claim.started and not started_too:
                continue
            if claim.task is not None:
                claim.task.cancel()
                await asyncio.gather(claim.task, return_exceptions=True)
            await self._guard(self.records.gave_back(claim.job_id))
            await self._guard(self._make_claimable(claim))
            log.info("jobs: gave back %s", claim.job_id)

    async def _guard(self, call: Awaitable[Any]) -> None:
        """A best-effort write: when Redis is down the entry stays pending and is reclaimed later anyway."""
        try:
            await call
        except Exception as exc:
            if not is_down(exc):
                raise
            self._set_up(False, exc)
