"""The cluster-wide result cache on Redis, behind each instance's small in-process cache.

Keys cover the model, its revision and the local cache key (image digest, prompt, generation parameters).
The cache keeps its own byte budget inside Redis (an LRU index in a sorted set and each entry's size in a
hash, updated atomically by one Lua script), so it never grows past ``max_bytes`` and never competes with
the jobs, which Redis keeps under ``noeviction``; entries also expire after ``ttl_s``. A write Redis refuses
(OOM: full of jobs) is dropped. When Redis does not answer, the cache is skipped for ``retry_s`` (no request
waits on a dead Redis twice in a row) and reported ``down`` in /health and ``llamactl_shared_cache_up``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from redis import exceptions as rx

from llamactl.server.engine.protocol import GenResult
from llamactl.state.client import connect, is_down, where
from llamactl.state.names import CACHE_BYTES, CACHE_PREFIX

log = logging.getLogger("llamactl.state.cache")

PREFIX = CACHE_PREFIX
ENTRY = PREFIX + "e:"
INDEX = PREFIX + "lru"  # member -> last use (seconds)
SIZES = PREFIX + "sizes"  # member -> bytes counted against the budget
TOTAL = CACHE_BYTES

# KEYS: index, sizes, total. ARGV: member, value, ttl_s, now, max_bytes, entry prefix.
_PUT = """
local size = string.len(ARGV[2])
local budget = tonumber(ARGV[5])
if size > budget then return 0 end
local old = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
redis.call('SET', ARGV[6] .. ARGV[1], ARGV[2], 'EX', ARGV[3])
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], size)
local total = redis.call('INCRBY', KEYS[3], size - old)
local evicted = 0
while total > budget do
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0)
  if #oldest == 0 then break end
  local gone = tonumber(redis.call('HGET', KEYS[2], oldest[1]) or '0')
  redis.call('ZREM', KEYS[1], oldest[1])
  redis.call('HDEL', KEYS[2], oldest[1])
  redis.call('DEL', ARGV[6] .. oldest[1])
  total = redis.call('DECRBY', KEYS[3], gone)
  evicted = evicted + 1
end
return evicted + 1
"""


def shared_key(model: str, revision: str | None, local_key: str) -> str:
    """The cluster-wide key: the local key (image digest, prompt, parameters) for this model and revision."""
    return hashlib.sha256(f"{model}\x00{revision or ''}\x00{local_key}".encode()).hexdigest()


def encode(result: GenResult) -> str:
    return json.dumps({"text": result.text, "prompt_tokens": result.prompt_tokens,
                       "completion_tokens": result.completion_tokens, "finish_reason": result.finish_reason},
                      separators=(",", ":"), ensure_ascii=False)


def decode(raw: str) -> GenResult | None:
    """The stored answer, or None for anything malformed (treated as a miss, never an error)."""
    try:
        data = json.loads(raw)
        return GenResult(text=str(data["text"]), prompt_tokens=int(data["prompt_tokens"]),
                         completion_tokens=int(data["completion_tokens"]), finish_reason=data["finish_reason"])
    except (ValueError, KeyError, TypeError):
        return None


class SharedCache:
    def __init__(self, url: str, *, model: str, revision: str | None, max_bytes: int, ttl_s: float,
                 registry: CollectorRegistry, timeout_s: float = 0.5, retry_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.url, self.model, self.revision = url, model, revision
        self.max_bytes, self.ttl_s, self.retry_s, self.clock = max_bytes, ttl_s, retry_s, clock
        self.redis = connect(url, timeout_s)
        self._put = self.redis.register_script(_PUT)
        self.down_until = 0.0
        self.last_error: str | None = None
        self.hits = Counter("llamactl_shared_cache_hits", "Cluster-wide (Redis) cache hits.", registry=registry)
        self.misses = Counter("llamactl_shared_cache_misses", "Cluster-wide (Redis) cache misses.",
                              registry=registry)
        self.errors = Counter("llamactl_shared_cache_errors", "Cluster-wide cache lookups or writes that failed "
                              "or were skipped because Redis was down.", registry=registry)
        self.evictions = Counter("llamactl_shared_cache_evictions", "Entries the cluster-wide cache evicted "
                                 "to stay within its byte budget.", registry=registry)
        up = Gauge("llamactl_shared_cache_up", "1 when the cluster-wide cache (Redis) answers, 0 while it is "
                   "skipped after a failure.", registry=registry)
        up.set_function(lambda: 0.0 if self.is_down else 1.0)

    @property
    def is_down(self) -> bool:
        return self.clock() < self.down_until

    def describe(self) -> dict[str, Any]:
        """For /health: where it is, whether it answers, and the last failure (never the password)."""
        return {"state": "down" if self.is_down else "ok", "redis": where(self.url),
                "max_bytes": self.max_bytes, "error": self.last_error if self.is_down else None}

    async def get(self, local_key: str) -> GenResult | None:
        if self.is_down:
            self.errors.inc()
            return None
        member = shared_key(self.model, self.revision, local_key)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.get(ENTRY + member)
                pipe.zadd(INDEX, {member: time.time()}, xx=True)  # touch (LRU) only if present
                raw, _ = await pipe.execute()
        except (rx.RedisError, OSError) as exc:
            self._failed(exc)
            return None
        found = decode(raw) if isinstance(raw, str) else None
        (self.hits if found is not None else self.misses).inc()
        return found

    async def put(self, local_key: str, result: GenResult) -> None:
        if self.is_down:
            self.errors.inc()
            return
        member = shared_key(self.model, self.revision, local_key)
        try:
            stored = await self._put(keys=[INDEX, SIZES, TOTAL],
                                     args=[member, encode(result), max(1, int(self.ttl_s)), repr(time.time()),
                                           self.max_bytes, ENTRY])
        except (rx.RedisError, OSError) as exc:
            self._failed(exc)
            return
        if int(stored) > 1:
            self.evictions.inc(int(stored) - 1)

    def _failed(self, exc: BaseException) -> None:
        self.errors.inc()
        if isinstance(exc, rx.ResponseError) and str(exc).startswith("OOM"):
            return  # Redis is full of jobs: this entry is not kept, the cache itself still works
        if not is_down(exc):
            log.warning("shared cache: unexpected Redis answer: %s", type(exc).__name__)
        self.last_error = f"Redis at {where(self.url)}: {type(exc).__name__}"
        if not self.is_down:
            log.warning("shared cache: Redis at %s does not answer (%s); skipping it for %gs",
                        where(self.url), type(exc).__name__, self.retry_s)
        self.down_until = self.clock() + self.retry_s

    async def close(self) -> None:
        await self.redis.aclose()
