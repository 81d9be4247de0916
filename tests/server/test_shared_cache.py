"""The cluster-wide cache between two real servers (the tiny checkpoint) sharing a real redis-server: a
deterministic request answered by one is a cache hit on the other; sampled requests are not shared; with Redis
down inference keeps answering and /health and /metrics say the shared cache is down."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.redis_support import PASSWORD, RedisServer

from ._support import ThreadServer, make_settings, png_b64, start_thread_server


@pytest.fixture(scope="module")
def pair(tiny_checkpoint: Path, redis_server: RedisServer) -> Iterator[tuple[ThreadServer, ThreadServer]]:
    def settings(instance: str) -> Any:
        return make_settings(tiny_checkpoint, redis_url=redis_server.url, instance=instance, cache_shared_mb=4,
                             gen_max_new_tokens=24)
    a, b = start_thread_server(settings("host-a/0")), start_thread_server(settings("host-b/0"))
    yield a, b
    a.stop()
    b.stop()


def infer(server: ThreadServer, question: str, **kw: Any) -> dict[str, Any]:
    r = httpx.post(server.url + "/infer", json={"image": png_b64("red"), "question": question,
                                                 "max_tokens": 24, **kw}, timeout=120)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def metric(server: ThreadServer, name: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def test_a_repeated_request_is_a_hit_on_the_other_instance(pair: tuple[ThreadServer, ThreadServer]) -> None:
    a, b = pair
    first = infer(a, "What colour is this?")
    assert first["cached"] is False
    second = infer(b, "What colour is this?")  # b never saw it: the answer comes from Redis
    assert second["cached"] is True and second["full_response"] == first["full_response"]
    assert metric(b, "llamactl_shared_cache_hits_total") == 1
    health = httpx.get(b.url + "/health", timeout=10).json()
    assert health["shared_cache"]["state"] == "ok" and PASSWORD not in str(health)


def test_sampled_requests_are_not_shared(pair: tuple[ThreadServer, ThreadServer]) -> None:
    a, b = pair
    assert infer(a, "Describe it.", temperature=0.9)["cached"] is False
    assert infer(b, "Describe it.", temperature=0.9)["cached"] is False


def test_redis_down_inference_answers_and_health_says_down(
        pair: tuple[ThreadServer, ThreadServer], redis_server: RedisServer) -> None:
    a, b = pair
    redis_server.stop()
    try:
        assert infer(a, "What is it?")["cached"] is False  # answered although Redis is gone
        assert infer(b, "What is it?")["cached"] is False  # not shared: Redis is down
        health = httpx.get(b.url + "/health", timeout=10).json()
        assert health["shared_cache"]["state"] == "down"
        assert "does not answer" not in str(health) and PASSWORD not in str(health)
        assert metric(b, "llamactl_shared_cache_up") == 0
        assert metric(b, "llamactl_shared_cache_errors_total") >= 1
    finally:
        redis_server.start()
