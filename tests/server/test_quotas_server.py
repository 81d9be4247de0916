"""Per-key quotas between two real servers (the tiny checkpoint) sharing a real redis-server: a key over its
requests-per-minute limit gets 429 (Retry-After, the limit named) from either instance; usage shows in /metrics
by key name, never by key; keys with bad limits stop the server with a clear message."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from llamactl.server.settings import Settings, SettingsError
from tests.redis_support import RedisServer

from ._support import ThreadServer, make_settings, png_b64, start_thread_server

ALICE, BOB = "sk-alice-secret-1", "sk-bob-secret-2"
KEYS = (f"name=alice key={ALICE} rpm=3", f"name=bob key={BOB}")


@pytest.fixture(scope="module")
def pair(tiny_checkpoint: Path, redis_server: RedisServer) -> Iterator[tuple[ThreadServer, ThreadServer]]:
    def settings(instance: str) -> Any:
        return make_settings(tiny_checkpoint, redis_url=redis_server.url, instance=instance, api_keys=KEYS,
                             gen_max_new_tokens=8, cache_max_entries=0)
    a, b = start_thread_server(settings("host-a/0")), start_thread_server(settings("host-b/0"))
    yield a, b
    a.stop()
    b.stop()


def infer(server: ThreadServer, key: str) -> httpx.Response:
    return httpx.post(server.url + "/infer", json={"image": png_b64("red"), "question": "What colour?",
                                                   "max_tokens": 8},
                      headers={"Authorization": f"Bearer {key}"}, timeout=120)


def test_a_key_over_its_limit_is_refused_by_every_instance(
        pair: tuple[ThreadServer, ThreadServer], redis_server: RedisServer) -> None:
    a, b = pair
    raw = redis.Redis.from_url(redis_server.url, decode_responses=True)
    minute = raw.time()[0] // 60
    codes = [infer(server, ALICE).status_code for server in (a, b, a, b, a)]
    if raw.time()[0] // 60 != minute:
        pytest.skip("a new minute began mid-test (windows are per minute); rerun")
    assert codes == [200, 200, 200, 429, 429]
    refused = infer(b, ALICE)
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    error = refused.json()["error"]
    assert (error["type"], error["limit"]) == ("rate_limited", "requests_per_minute")
    assert "limit of 3 requests per minute" in error["message"]
    assert infer(a, BOB).status_code == 200  # another key is not affected
    usage = raw.hgetall("llamactl:usage:alice")
    assert usage["requests"] == "3" and int(usage["rejected"]) == 3 and int(usage["completion_tokens"]) > 0
    raw.close()


def test_usage_in_metrics_by_name_never_by_key(pair: tuple[ThreadServer, ThreadServer]) -> None:
    a, _ = pair
    text = httpx.get(a.url + "/metrics", timeout=10).text
    assert 'llamactl_key_requests_total{key="alice"}' in text
    assert 'llamactl_key_completion_tokens_total{key="alice"}' in text
    assert ALICE not in text and BOB not in text
    health = httpx.get(a.url + "/health", timeout=10).json()
    assert health["quotas"]["state"] == "redis" and health["quotas"]["limited"] == ["alice"]
    assert ALICE not in str(health)


def test_bad_key_entries_are_a_settings_error_without_the_key() -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"LLAMACTL_MODEL": "/m", "LLAMACTL_API_KEYS": f"name=alice key={ALICE} rpm=lots"})
    assert "found rpm='lots', expected a whole number >= 1" in str(caught.value)
    assert ALICE not in str(caught.value)
