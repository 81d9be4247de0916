"""The cluster-wide result cache (``llamactl.state.cache``) on a real redis-server: shared between clients,
kept within its byte budget, keyed by model and revision, skipped (and reported down) while Redis is down."""

from __future__ import annotations

import asyncio

import redis
from prometheus_client import CollectorRegistry

from llamactl.server.engine.protocol import GenResult
from llamactl.state import cache as shared
from tests.redis_support import PASSWORD, RedisServer


def result(text: str) -> GenResult:
    return GenResult(text=text, prompt_tokens=11, completion_tokens=7, finish_reason="stop")


def make(url: str, max_bytes: int = 1 << 20, model: str = "/srv/models/tiny", revision: str | None = None,
         clock: list[float] | None = None) -> shared.SharedCache:
    now = clock if clock is not None else [0.0]
    return shared.SharedCache(url, model=model, revision=revision, max_bytes=max_bytes, ttl_s=60,
                              registry=CollectorRegistry(), clock=lambda: now[0])


def test_an_answer_stored_by_one_instance_is_a_hit_for_another(redis_server: RedisServer) -> None:
    async def go() -> None:
        a, b = make(redis_server.url), make(redis_server.url)
        assert await b.get("k1") is None
        await a.put("k1", result("a red square"))
        hit = await b.get("k1")
        assert hit == result("a red square")
        other_model = make(redis_server.url, model="/srv/models/other")
        assert await other_model.get("k1") is None
        other_revision = make(redis_server.url, revision="abc123")
        assert await other_revision.get("k1") is None
        assert (b.hits._value.get(), b.misses._value.get()) == (1, 1)
        for c in (a, b, other_model, other_revision):
            await c.close()
    asyncio.run(go())


def test_the_byte_budget_evicts_least_recently_used_first(redis_server: RedisServer) -> None:
    async def go() -> None:
        entry = len(shared.encode(result("x" * 100)))
        c = make(redis_server.url, max_bytes=3 * entry)
        for k in ("k1", "k2", "k3"):
            await c.put(k, result("x" * 100))
        assert await c.get("k1") is not None  # k1 now most recently used
        await c.put("k4", result("x" * 100))  # over budget: k2 goes
        assert await c.get("k2") is None
        assert all([await c.get(k) is not None for k in ("k1", "k3", "k4")])
        assert c.evictions._value.get() == 1
        raw = redis.Redis.from_url(redis_server.url, decode_responses=True)
        assert int(raw.get(shared.TOTAL)) == 3 * entry
        assert raw.zcard(shared.INDEX) == 3 and raw.hlen(shared.SIZES) == 3
        assert 0 < raw.ttl(shared.ENTRY + shared.shared_key(c.model, None, "k1")) <= 60
        raw.close()
        await c.put("big", result("y" * (4 * entry)))  # larger than the whole budget: not stored
        assert await c.get("big") is None
        await c.close()
    asyncio.run(go())


def test_redis_down_is_skipped_then_retried(redis_server: RedisServer) -> None:
    async def go() -> None:
        clock = [100.0]
        c = make(redis_server.url, clock=clock)
        await c.put("k1", result("kept"))
        redis_server.stop()
        assert await c.get("k1") is None  # a miss, not an error
        assert c.is_down and c.describe()["state"] == "down"
        assert PASSWORD not in str(c.describe())
        errors = c.errors._value.get()
        await c.put("k2", result("dropped"))  # skipped without touching Redis
        assert c.errors._value.get() == errors + 1
        redis_server.start()  # same port and append-only file
        clock[0] += 10  # past retry_s
        assert c.describe()["state"] == "ok"
        assert await c.get("k1") == result("kept")
        await c.close()
    asyncio.run(go())


def test_a_malformed_entry_is_a_miss() -> None:
    assert shared.decode("{not json") is None
    assert shared.decode('{"text": "t"}') is None
    assert shared.decode(shared.encode(result("ok"))) == result("ok")
