"""The jobs stream on a real redis-server: consumers with slots, reclaim of a dead consumer's job, failures
counted per delivery, give-back on drain, a Redis restart losing nothing, and Redis down."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from llamactl.state.client import StateUnavailable, connect
from llamactl.state.consumer import JobConsumer
from llamactl.state.jobs import GROUP, STREAM, JobFailed, JobRecords
from llamactl.state.service import SharedJobs
from tests.redis_support import PASSWORD, RedisServer

WAIT_S = 30.0  # generous: the machine is shared and slow


async def until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {WAIT_S}s: {what}")
        await asyncio.sleep(0.02)


def consumer(records: JobRecords, run: Any, *, slots: int = 1, claim_idle_s: float = 60.0,
             max_deliveries: int = 3, accepting: Callable[[], bool] = lambda: True,
             room: Callable[[], bool] = lambda: True, name: str = "test") -> JobConsumer:
    c = JobConsumer(records, run, name=name, slots=slots, claim_idle_s=claim_idle_s,
                    max_deliveries=max_deliveries, accepting=accepting, room=room)
    c.start()
    return c


async def status(records: JobRecords, job_id: str) -> str:
    job = await records.get(job_id)
    assert job is not None
    return str(job["status"])


def test_submit_run_get_and_slots(redis_server: RedisServer) -> None:
    async def go() -> None:
        records = JobRecords(connect(redis_server.url), ttl_s=60)
        gate = asyncio.Event()
        started: list[str] = []

        async def run(request: dict[str, Any], on_start: Callable[[], None]) -> dict[str, Any]:
            started.append(request["n"])
            on_start()
            await gate.wait()
            return {"echo": request["n"]}

        ids = [await records.submit({"n": str(i)}) for i in range(3)]
        assert [await status(records, i) for i in ids] == ["queued"] * 3
        a = consumer(records, run, slots=1, name="a")
        b = consumer(records, run, slots=1, name="b")
        await until(lambda: _true(len(started) == 2), "two jobs running")
        await asyncio.sleep(0.3)  # not synchronisation: a window in which a third claim would show
        assert len(started) == 2 and a.active == 1 and b.active == 1  # one slot each: the third waits
        assert sorted([await status(records, i) for i in ids]) == ["queued", "running", "running"]
        gate.set()
        for job_id in ids:
            await until(lambda j=job_id: _eq(status(records, j), "succeeded"), f"{job_id} succeeded")
        job = await records.get(ids[0])
        assert job is not None and job["result"] == {"echo": "0"} and job["finished"] >= job["created"]
        assert await records.backlog() == 0  # ended entries leave the stream
        assert await records.redis.ttl(f"llamactl:job:{ids[0]}") > 0
        await a.stop()
        await b.stop()
        await records.redis.aclose()

    asyncio.run(go())


async def _true(value: bool) -> bool:
    return value


async def _eq(value: Awaitable[str], expected: str) -> bool:
    return await value == expected


def test_no_claim_while_the_admission_queue_is_full(redis_server: RedisServer) -> None:
    async def go() -> None:
        records = JobRecords(connect(redis_server.url), ttl_s=60)
        room = [False]

        async def run(request: dict[str, Any], on_start: Callable[[], None]) -> dict[str, Any]:
            return {"ok": True}

        job_id = await records.submit({"n": "1"})
        c = consumer(records, run, slots=4, room=lambda: room[0])
        await asyncio.sleep(0.6)  # not synchronisation: more than one loop turn in which a claim would show
        assert await status(records, job_id) == "queued" and c.active == 0
        room[0] = True
        await until(lambda: _eq(status(records, job_id), "succeeded"), "claimed once there is room")
        await c.stop()
        await records.redis.aclose()

    asyncio.run(go())


def test_a_dead_consumers_job_is_reclaimed_and_failures_counted(redis_server: RedisServer) -> None:
    async def go() -> None:
        redis = connect(redis_server.url)
        records = JobRecords(redis, ttl_s=60)
        await records.ensure_group()
        ok_id = await records.submit({"n": "ok"})
        # A consumer that read the entry and died: it stays pending on "dead" and is never acknowledged.
        read = await redis.xreadgroup(GROUP, "dead", {STREAM: ">"}, count=1)
        assert read[0][1][0][1]["job"] == ok_id

        async def run(request: dict[str, Any], on_start: Callable[[], None]) -> dict[str, Any]:
            if request["n"] == "boom":
                raise JobFailed({"message": "engine exploded", "type": "engine_error", "status": 500},
                                retry=True)
            if request["n"] == "bad":
                raise JobFailed({"message": "not an image", "type": "invalid_image", "status": 400},
                                retry=False)
            return {"ok": True}

        c = consumer(records, run, claim_idle_s=0.5, max_deliveries=2)
        await until(lambda: _eq(status(records, ok_id), "succeeded"), "the dead consumer's job reclaimed")
        boom = await records.submit({"n": "boom"})
        bad = await records.submit({"n": "bad"})
        await until(lambda: _eq(status(records, boom), "failed"), "boom failed")
        await until(lambda: _eq(status(records, bad), "failed"), "bad failed")
        job = await records.get(boom)
        assert job is not None and job["error"] == {
            "message": "gave up after 2 failed deliveries; the last: engine exploded",
            "type": "job_failed", "status": 500}
        job = await records.get(bad)  # the request's own fault: at once, as it was
        assert job is not None and job["error"] == {"message": "not an image", "type": "invalid_image",
                                                    "status": 400}
        assert await records.backlog() == 0
        pending = await redis.xpending(STREAM, GROUP)
        assert pending["pending"] == 0
        await c.stop()
        await redis.aclose()

    asyncio.run(go())


def test_drain_gives_back_claimed_jobs_that_have_not_started(redis_server: RedisServer) -> None:
    async def go() -> None:
        records = JobRecords(connect(redis_server.url), ttl_s=60)
        accepting = [True]
        never = asyncio.Event()

        async def stuck(request: dict[str, Any], on_start: Callable[[], None]) -> dict[str, Any]:
            await never.wait()  # waits in the queue: never produces output
            return {}

        async def quick(request: dict[str, Any], on_start: Callable[[], None]) -> dict[str, Any]:
            return {"by": "other"}

        job_id = await records.submit({"n": "1"})
        a = consumer(records, stuck, accepting=lambda: accepting[0], name="a")
        await until(lambda: _eq(status(records, job_id), "running"), "a claimed it")
        accepting[0] = False  # draining
        await until(lambda: _true(a.active == 0), "a gave it back")
        fields = await records.fields(job_id)
        assert fields["status"] == "queued" and fields["gave_back"] == "1"
        b = consumer(records, quick, claim_idle_s=60.0, name="b")  # long claim timeout: given back = claimable now
        await until(lambda: _eq(status(records, job_id), "succeeded"), "b ran it")
        job = await records.get(job_id)
        assert job is not None and job["result"] == {"by": "other"}
        await a.stop()
        await b.stop()
        await records.redis.aclose()

    asyncio.run(go())


def test_redis_restart_loses_no_accepted_job(redis_server: RedisServer) -> None:
    async def go() -> None:
        records = JobRecords(connect(redis_server.url), ttl_s=60)
        gate = asyncio.Event()
        done: list[str] = []

        async def run(request: dict[str, Any], on_start: Callable[[], None]) -> dict[str, Any]:
            on_start()
            await gate.wait()
            done.append(request["n"])
            return {"n": request["n"]}

        ids = [await records.submit({"n": str(i)}) for i in range(10)]
        c = consumer(records, run, slots=2)
        await until(lambda: _true(c.active == 2), "two running")
        await asyncio.to_thread(redis_server.restart)  # SIGTERM: the append-only file is flushed
        gate.set()  # the two running jobs finish (their ends are written once Redis answers again)
        for job_id in ids:
            await until(lambda j=job_id: _eq(status(records, j), "succeeded"), f"{job_id} after the restart")
        assert sorted(done, key=int) == [str(i) for i in range(10)]  # each ran once
        await c.stop()
        await records.redis.aclose()

    asyncio.run(go())


def test_redis_down_is_a_plain_error(tmp_path: Path) -> None:
    async def go() -> None:
        server = RedisServer.with_password(tmp_path, PASSWORD)  # never started: nothing listens
        jobs = SharedJobs(server.url, instance="x", ttl_s=60, slots=1, claim_idle_s=1, max_deliveries=1,
                          accepting=lambda: True)
        with pytest.raises(StateUnavailable) as caught:
            await jobs.submit({"n": "1"})
        assert str(caught.value) == f"the job store (Redis at 127.0.0.1:{server.port}) is unreachable; retry later"
        with pytest.raises(StateUnavailable):
            await jobs.get("job-" + "0" * 32)
        await jobs.stop()

    asyncio.run(go())


def test_the_redis_url_is_hashed_and_never_shown() -> None:
    from llamactl.server.settings import Settings

    url = f"redis://:{PASSWORD}@10.0.0.2:6379/0"
    with_url = Settings.from_env({"LLAMACTL_MODEL": "m", "LLAMACTL_REDIS_URL": url})
    other = Settings.from_env({"LLAMACTL_MODEL": "m", "LLAMACTL_REDIS_URL": url.replace("0123", "0124")})
    without = Settings.from_env({"LLAMACTL_MODEL": "m", "LLAMACTL_REDIS_URL": ""})
    assert with_url.redis_url == url and without.redis_url is None
    assert len({with_url.config_hash(), other.config_hash(), without.config_hash()}) == 3
    assert PASSWORD not in repr(with_url)
    from llamactl.server.settings import SettingsError

    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"LLAMACTL_MODEL": "m", "LLAMACTL_REDIS_URL": f"http://:{PASSWORD}@x"})
    assert PASSWORD not in str(caught.value) and "LLAMACTL_REDIS_URL" in str(caught.value)
