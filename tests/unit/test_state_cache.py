"""The cluster-wide result cache (``llamactl.state.cache``) on a real redis-server: shared between clients,
kept within its byte budget, keyed by model and revision, skipped (and reported down) while Redis is down."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from prometheus_client import CollectorRegistry

from llamactl.server.engine.protocol import GenResult
from llamactl.state import cache as shared
from tests.redis_support import RedisServer

PASSWORD = "cache-test-password-0123"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    srv = RedisServer.with_password(tmp_path, PASSWORD)
    srv.start()
    yield srv
    srv.stop()


def result(text: str) -> GenResult:
    return GenResult(text=text, prompt_tokens=11, completion_tokens=7, finish_reason="stop")


def make(url: str, max_bytes: int = 1 << 20, model: str = "/srv/models/tiny", revision: str | None = None,
         clock: list[float] | None = None) -> shared.SharedCache:
    now = clock if clock is not None else [0.0]
    return shared.SharedCache(url, model=model, revision=revision, max_bytes=max_bytes, ttl_s=60,
                              registry=CollectorRegistry(), clock=lambda: now[0])


def test_an_answer_stored_by_one_instance_is_a_hit_for_another(server: RedisServer) -> None:
    async def go() -> None:
        a, b = make(server.url), make(server.url)
        assert await b.get("k1") is None
        await a.put("k1", result("a red square"))
        hit = await b.get("k1")
        assert hit == result("a red square")
        other_model = make(server.url, model="/srv/models/other")
        assert await other_model.get("k1") is None
        other_revision = make(server.url, revision="abc123")
        assert await other_revision.get("k1") is None
        assert (b.hits._value.get(), b.misses._value.get()) == (1, 1)
        for c in (a, b, other_model, other_revision):
            await c.close()
    asyncio.run(go())


def test_the_byte_budget_evicts_least_recently_used_first(server: RedisServer) -> None:
    async def go() -> None:
        entry = len(shared.encode(result("x" * 100)))
        c = make(server.url, max_bytes=3 * entry)
        for k in ("k1", "k2", "k3"):
            await c.put(k, result("x" * 100))
        assert await c.get("k1") is not None  # k1 now most recently used
        await c.put("k4", result("x" * 100))  # over budget: k2 goes
        assert await c.get("k2") is None
        assert all([await c.get(k) is not None for k in ("k1", "k3", "k4")])
        assert c.evictions._value.get() == 1
        raw = redis.Redis.from_url(server.url, decode_responses=True)
        assert int(raw.get(shared.TOTAL)) == 3 * entry
        assert raw.zcard(shared.INDEX) == 3 and raw.hlen(shared.SIZES) == 3
        assert 0 < raw.ttl(shared.ENTRY + shared.shared_key(c.model, None, "k1")) <= 60
        raw.close()
        await c.put("big", result("y" * (4 * entry)))  # larger than the whole budget: not stored
        assert await c.get("big") is None
        await c.close()
    asyncio.run(go())


def test_redis_down_is_skipped_then_retried(server: RedisServer) -> None:
    async def go() -> None:
        clock = [100.0]
        c = make(server.url, clock=clock)
        await c.put("k1", result("kept"))
        server.stop()
        assert await c.get("k1") is None  # a miss, not an error
        assert c.is_down and c.describe()["state"] == "down"
        assert PASSWORD not in str(c.describe())
        errors = c.errors._value.get()
        await c.put("k2", result("dropped"))  # skipped without touching Redis
        assert c.errors._value.get() == errors + 1
        server.start()  # same port and append-only file
        clock[0] += 10  # past retry_s
        assert c.describe()["state"] == "ok"
        assert await c.get("k1") == result("kept")
        await c.close()
    asyncio.run(go())


def test_a_malformed_entry_is_a_miss() -> None:
    assert shared.decode("{not json") is None
    assert shared.decode('{"text": "t"}') is None
    assert shared.decode(shared.encode(result("ok"))) == result("ok")
