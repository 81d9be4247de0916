"""Job retention: results stay for GET until their TTL passes or newer jobs push out the oldest finished."""

from __future__ import annotations

import asyncio

import pytest

from llamactl.server.jobs import JobsFull, JobStore


def test_retention_by_ttl_and_count() -> None:
    now = [1000.0]
    store = JobStore(max_entries=2, ttl_s=60, clock=lambda: now[0])

    async def go() -> None:
        async def ok() -> dict[str, object]:
            return {"answer": 42}

        async def fail() -> dict[str, object]:
            raise ValueError("bad")

        a = store.submit(ok, lambda e: {"message": str(e)})
        b = store.submit(fail, lambda e: {"message": str(e)})
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        got_a, got_b = store.get(a.id), store.get(b.id)
        assert got_a is not None and got_a.to_dict()["result"] == {"answer": 42}
        assert got_b is not None and got_b.status == "failed" and got_b.error == {"message": "bad"}
        store.check_room()  # full: drops the oldest finished job (a)
        assert store.get(a.id) is None and store.get(b.id) is not None
        now[0] += 61
        assert store.get(b.id) is None  # expired

        gate = asyncio.Event()

        async def slow() -> dict[str, object]:
            await gate.wait()
            return {}

        store.submit(slow, lambda e: {})
        store.submit(slow, lambda e: {})
        with pytest.raises(JobsFull):  # running jobs are never dropped
            store.check_room()
        gate.set()
        await store.cancel_all()

    asyncio.run(go())
