"""Asynchronous jobs: POST returns an id at once; the result is kept (bounded by count and age) for GET.

The seed's async endpoint returned an id and threw the result away; here finished jobs stay retrievable until
they are older than ``ttl_s`` or pushed out by newer ones (oldest finished first; running jobs are never dropped).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

JobStatus = Literal["queued", "running", "succeeded", "failed"]
JOB_ID_PATTERN = r"^job-[0-9a-f]{32}$"  # what new_job_id makes; the API refuses other ids with 422


def new_job_id(route: str = "") -> str:
    """``job-`` + 32 hex digits; with ``route`` (``route_tag`` of this instance) the first 8 name the
    instance, so the balancer can send GET /v1/jobs/{id} of an in-memory job to the instance that holds it."""
    return "job-" + (route + uuid.uuid4().hex)[:32]


def route_tag(instance: str) -> str:
    """8 hex digits naming an instance id in its job ids (the balancer config maps them back)."""
    return hashlib.sha256(instance.encode()).hexdigest()[:8]


class JobsFull(Exception):
    pass


@dataclass
class Job:
    id: str
    created: float = field(default_factory=time.time)
    status: JobStatus = "queued"
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    finished: float | None = None
    task: asyncio.Task[None] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "object": "job", "status": self.status, "created": self.created}
        if self.finished is not None:
            out["finished"] = self.finished
        if self.result is not None:
            out["result"] = self.result
        if self.error is not None:
            out["error"] = self.error
        return out


class JobStore:
    def __init__(self, max_entries: int, ttl_s: float, clock: Callable[[], float] = time.time,
                 instance: str = "") -> None:
        self.route = route_tag(instance) if instance else ""  # job ids name this instance (see new_job_id)
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self.clock = clock
        self._jobs: OrderedDict[str, Job] = OrderedDict()

    @property
    def active(self) -> int:
        return sum(1 for j in self._jobs.values() if j.status in ("queued", "running"))

    def check_room(self) -> None:
        """Make room for one more job (dropping the oldest finished one) or raise JobsFull."""
        self._expire()
        if len(self._jobs) < self.max_entries:
            return
        for jid, job in list(self._jobs.items()):
            if job.status in ("succeeded", "failed"):
                del self._jobs[jid]
                return
        raise JobsFull(f"{self.max_entries} jobs are already queued or running; retry later")

    def submit(
        self,
        work: Callable[[], Awaitable[dict[str, Any]]],
        on_error: Callable[[BaseException], dict[str, Any]],
    ) -> Job:
        """Start ``work`` as a job. Call ``check_room`` first; this never refuses (admission already happened)."""
        job = Job(id=new_job_id(self.route), created=self.clock())
        self._jobs[job.id] = job

        async def runner() -> None:
            job.status = "running"
            try:
                job.result = await work()
                job.status = "succeeded"
            except asyncio.CancelledError:
                job.status, job.error = "failed", {"message": "the server shut down", "type": "cancelled"}
                raise
            except Exception as exc:  # noqa: BLE001 - the error mapping is the caller's
                job.status, job.error = "failed", on_error(exc)
            finally:
                job.finished = self.clock()

        job.task = asyncio.get_running_loop().create_task(runner())
        return job

    def get(self, job_id: str) -> Job | None:
        self._expire()
        return self._jobs.get(job_id)

    def _expire(self) -> None:
        now = self.clock()
        for jid, job in list(self._jobs.items()):
            if job.finished is not None and now - job.finished > self.ttl_s:
                del self._jobs[jid]

    async def cancel_all(self) -> None:
        tasks = [j.task for j in self._jobs.values() if j.task is not None and not j.task.done()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
