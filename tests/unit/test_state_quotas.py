"""API key entries (names, limits) and per-key quotas: pure parsing, the in-process windows, and the cluster-wide
count on a real redis-server shared by two ``Quotas`` (two instances)."""

from __future__ import annotations

import asyncio

import pytest
import redis
from prometheus_client import CollectorRegistry

from llamactl.state.keys import KeyPolicy, KeySpecError, default_name, parse_entries
from llamactl.state.quotas import LocalWindows, Quotas
from tests.redis_support import RedisServer

SECRET = "sk-very-secret-123"


def test_bare_and_named_entries() -> None:
    bare, named = parse_entries([SECRET, "name=alice key=sk-alice rpm=3 tpm=100"])
    assert bare == KeyPolicy(default_name(SECRET), SECRET) and bare.name.startswith("key-") and not bare.limited
    assert (named.name, named.key, named.rpm, named.tpm) == ("alice", "sk-alice", 3, 100)
    assert SECRET not in repr(bare)


@pytest.mark.parametrize(("entry", "message"), [
    ("name=alice rpm=3", "key 1: found no key=, expected key=KEY in an entry with fields"),
    (f"name=alice key={SECRET} rpm=0", "key 1: found rpm='0', expected a whole number >= 1"),
    (f"name=alice key={SECRET} rpm=x", "key 1: found rpm='x', expected a whole number >= 1"),
    (f"name=al/ice key={SECRET}", "key 1: found name='al/ice', expected 1-64 letters, digits, '_', '.' or '-'"),
    (f"name=alice {SECRET}", ("key 1: found an unknown field (word 2), expected name=, key=, rpm= or tpm= "
                              "separated by spaces")),
    (f"name=a name=b key={SECRET}", "key 1: found name= twice, expected it once"),
])
def test_bad_entries_are_named_by_position_never_echoed(entry: str, message: str) -> None:
    with pytest.raises(KeySpecError) as caught:
        parse_entries([entry], "key")
    assert str(caught.value) == message
    assert SECRET not in str(caught.value)


def test_duplicates() -> None:
    with pytest.raises(KeySpecError) as caught:
        parse_entries(["name=a key=k1", "name=a key=k2", "name=b key=k1"])
    assert str(caught.value) == ("name 'a' is used by two keys, expected one name per key; the same key appears "
                                 "twice (as 'a' and 'b'), expected each key once")


def test_local_windows_refuse_past_the_limit_and_reset_each_minute() -> None:
    now = [120.0]
    w = LocalWindows(clock=lambda: now[0])
    p = KeyPolicy("a", "k", rpm=2, tpm=50)
    assert w.admit(p) is None and w.admit(p) is None
    assert w.admit(p) == ("requests_per_minute", 60)
    now[0] = 185.0  # the next window, 55 s before its end
    assert w.admit(p) is None
    w.charge("a", 50)
    assert w.admit(p) == ("tokens_per_minute", 55)


def test_limits_hold_across_instances_through_redis(redis_server: RedisServer) -> None:
    policies = parse_entries(["name=alice key=sk-a rpm=5", "name=bob key=sk-b tpm=30", "sk-free"])

    async def go() -> None:
        one, two = (Quotas(policies, redis_server.url, CollectorRegistry()) for _ in range(2))
        raw = redis.Redis.from_url(redis_server.url, decode_responses=True)
        minute = raw.time()[0] // 60
        results = [await (one if i % 2 else two).admit("alice") for i in range(8)]
        turned = raw.time()[0] // 60 != minute  # a new window began mid-test: it may admit up to 5 more
        admitted = [r for r in results if r is None]
        refused = [r for r in results if r is not None]
        assert len(admitted) == 5 or (turned and 5 < len(admitted) <= 8)
        assert all(r.limit == "requests_per_minute" and r.value == 5 and 1 <= r.retry_after_s <= 60
                   for r in refused)
        assert not refused or "over its limit of 5 requests per minute" in refused[0].message
        assert await one.admit("bob") is None
        await one.charge("bob", 20, 15)  # 35 >= 30: bob's next request is refused, on either instance
        refusal = await two.admit("bob")
        assert refusal is not None and refusal.limit == "tokens_per_minute"
        assert await two.admit(default_name("sk-free")) is None
        usage = raw.hgetall("llamactl:usage:bob")
        assert (usage["requests"], usage["prompt_tokens"], usage["completion_tokens"]) == ("1", "20", "15")
        assert int(raw.hget("llamactl:usage:alice", "requests") or 0) == len(admitted)
        assert all("sk-" not in k for k in raw.keys("llamactl:*"))  # keys never reach Redis, names do
        raw.close()
        await one.close()
        await two.close()
    asyncio.run(go())


def test_redis_down_falls_back_to_counting_per_instance(redis_server: RedisServer) -> None:
    policies = parse_entries(["name=alice key=sk-a rpm=2"])

    async def go() -> None:
        q = Quotas(policies, redis_server.url, CollectorRegistry())
        redis_server.stop()
        assert await q.admit("alice") is None and await q.admit("alice") is None
        refusal = await q.admit("alice")
        assert refusal is not None and refusal.limit == "requests_per_minute"
        assert q.describe()["state"] == "local (Redis down)" and not q.shared
        await q.close()
        redis_server.start()
    asyncio.run(go())
