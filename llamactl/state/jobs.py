"""Jobs in Redis: a stream of requests (one consumer group for every instance) and a hash per job.

    llamactl:jobs          stream; entry fields: job (its id), request (the POST body as JSON)
    llamactl:job:<id>      hash: status, created, finished, result | error (JSON), instance, last_error,
                           gave_back (deliveries handed back unstarted: they do not count as failures)

A job is accepted when one MULTI/EXEC wrote both its hash and its stream entry. An entry leaves the stream only
when the job ends (acknowledged and deleted together with the final write, in one script); until then it is
either unread or pending on the consumer that claimed it, where XAUTOCLAIM finds it if that consumer goes quiet.
Finished jobs expire after ``ttl_s``; unfinished ones after ``UNFINISHED_TTL_S`` (a bound on leaks, not a limit).
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal, cast

from redis import exceptions as rx
from redis.asyncio import Redis

from llamactl.server.jobs import new_job_id
from llamactl.state import names

STREAM = names.STREAM
GROUP = names.GROUP

UNFINISHED_TTL_S = 7 * 86400
Final = Literal["succeeded", "failed"]


def job_key(job_id: str) -> str:
    return f"llamactl:job:{job_id}"


class JobFailed(Exception):
    """A job's run failed. ``retry``: another delivery may succeed (engine error, timeout, shutting down);
    otherwise the request itself is at fault and the job fails at once."""

    def __init__(self, error: dict[str, Any], *, retry: bool) -> None:
        super().__init__(error.get("message", "failed"))
        self.error, self.retry = error, retry


# Ends a job once: a late second finisher (a consumer that was presumed dead) only acknowledges.
_FINISH = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'succeeded' and status ~= 'failed' then
  redis.call('HSET', KEYS[1], 'status', ARGV[3], ARGV[4], ARGV[5], 'finished', ARGV[6])
  redis.call('EXPIRE', KEYS[1], ARGV[7])
end
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
return status
"""


class JobRecords:
    """Reads and writes of the stream and the job hashes (no loop, no policy: see consumer.py)."""

    def __init__(self, redis: Redis, ttl_s: float) -> None:
        self.redis = redis
        self.ttl_s = ttl_s
        self._finish = redis.register_script(_FINISH)

    async def ensure_group(self) -> None:
        """The consumer group, reading from the stream's start (so entries added before it exist are served)."""
        try:
            await self.redis.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        except rx.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def submit(self, request: dict[str, Any]) -> str:
        job_id = new_job_id()
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(job_key(job_id), mapping={"status": "queued", "created": repr(time.time())})
            pipe.expire(job_key(job_id), UNFINISHED_TTL_S)
            pipe.xadd(STREAM, {"job": job_id, "request": json.dumps(request, separators=(",", ":"))})
            await pipe.execute()
        return job_id

    async def get(self, job_id: str) -> dict[str, Any] | None:
        """The job as GET /v1/jobs/{id} shows it, or None when unknown or expired."""
        fields = await self.fields(job_id)
        if not fields or "status" not in fields:
            return None
        out: dict[str, Any] = {"id": job_id, "object": "job", "status": fields["status"],
                               "created": float(fields.get("created", "0"))}
        if "finished" in fields:
            out["finished"] = float(fields["finished"])
        for name in ("result", "error"):
            if name in fields:
                out[name] = json.loads(fields[name])
        return out

    async def fields(self, job_id: str) -> dict[str, str]:
        return cast("dict[str, str]", await self.redis.hgetall(job_key(job_id)))  # decode_responses

    async def running(self, job_id: str, consumer: str) -> None:
        await self.redis.hset(job_key(job_id), mapping={"status": "running", "instance": consumer})

    async def finish(self, job_id: str, entry_id: str, status: Final, payload: dict[str, Any]) -> None:
        field = "result" if status == "succeeded" else "error"
        await self._finish(
            keys=[job_key(job_id), STREAM],
            args=[GROUP, entry_id, status, field, json.dumps(payload, separators=(",", ":")),
                  repr(time.time()), int(self.ttl_s)],
        )

    async def note_failure(self, job_id: str, message: str) -> None:
        await self.redis.hset(job_key(job_id), mapping={"status": "queued", "last_error": message})

    async def gave_back(self, job_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hincrby(job_key(job_id), "gave_back", 1)
            pipe.hset(job_key(job_id), "status", "queued")
            await pipe.execute()

    async def backlog(self) -> int:
        """Jobs in the stream: waiting to be read or claimed and not yet finished."""
        length: int = await self.redis.xlen(STREAM)
        return length
