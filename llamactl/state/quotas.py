"""Per-key quotas and usage, enforced across the cluster through Redis (fixed one-minute windows on Redis'
own clock, so every instance counts in the same window).

``admit`` runs before an inference request: over ``rpm`` (requests per minute) or ``tpm`` (tokens per minute,
counted when answers finish, so one request in flight can pass the limit) it returns a ``Refusal`` naming the
limit and the seconds until the window ends. ``charge`` adds an answer's tokens. Cluster-wide usage per key name
lives in the hash ``llamactl:usage:NAME`` (requests, rejected, prompt_tokens, completion_tokens); each instance's
own share is in /metrics labelled by name, never by key. Without Redis, or while it does not answer, the same
limits are enforced per instance in memory (reported ``local`` in /health and ``llamactl_quota_shared_up 0``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from redis import exceptions as rx

from llamactl.state.client import connect, where
from llamactl.state.keys import KeyPolicy

log = logging.getLogger("llamactl.state.quotas")

WINDOW_S = 60

# ARGV: name, rpm (0 = none), tpm (0 = none). Returns {admitted 0/1, limit, retry_after_s}.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1])
local base = 'llamactl:quota:' .. ARGV[1] .. ':' .. (now - now % 60)
local retry = 60 - now % 60
local usage = 'llamactl:usage:' .. ARGV[1]
local tpm = tonumber(ARGV[3])
if tpm > 0 and tonumber(redis.call('GET', base .. ':t') or '0') >= tpm then
  redis.call('HINCRBY', usage, 'rejected', 1)
  return {0, 'tokens_per_minute', retry}
end
local rpm = tonumber(ARGV[2])
if rpm > 0 then
  local n = redis.call('INCR', base .. ':r')
  redis.call('EXPIRE', base .. ':r', 120)
  if n > rpm then
    redis.call('HINCRBY', usage, 'rejected', 1)
    return {0, 'requests_per_minute', retry}
  end
end
redis.call('HINCRBY', usage, 'requests', 1)
return {1, '', 0}
"""

# ARGV: name, prompt tokens, completion tokens.
_CHARGE = """
local t = redis.call('TIME')
local now = tonumber(t[1])
local key = 'llamactl:quota:' .. ARGV[1] .. ':' .. (now - now % 60) .. ':t'
redis.call('INCRBY', key, tonumber(ARGV[2]) + tonumber(ARGV[3]))
redis.call('EXPIRE', key, 120)
local usage = 'llamactl:usage:' .. ARGV[1]
redis.call('HINCRBY', usage, 'prompt_tokens', ARGV[2])
redis.call('HINCRBY', usage, 'completion_tokens', ARGV[3])
return 1
"""


@dataclass(frozen=True)
class Refusal:
    limit: str  # requests_per_minute or tokens_per_minute
    value: int
    retry_after_s: int

    @property
    def message(self) -> str:
        what = "requests" if self.limit == "requests_per_minute" else "tokens"
        return (f"this API key is over its limit of {self.value} {what} per minute ({self.limit}); "
                f"retry after {self.retry_after_s} s")


class LocalWindows:
    """The same fixed windows in this process (no Redis, or Redis down). ``clock``: wall seconds."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.counts: dict[tuple[str, int, str], int] = {}

    def _window(self) -> tuple[int, int]:
        now = int(self.clock())
        return now - now % WINDOW_S, WINDOW_S - now % WINDOW_S

    def admit(self, policy: KeyPolicy) -> tuple[str, int] | None:
        window, retry = self._window()
        self.counts = {k: v for k, v in self.counts.items() if k[1] >= window}  # forget past windows
        if policy.tpm is not None and self.counts.get((policy.name, window, "t"), 0) >= policy.tpm:
            return "tokens_per_minute", retry
        if policy.rpm is not None:
            n = self.counts[(policy.name, window, "r")] = self.counts.get((policy.name, window, "r"), 0) + 1
            if n > policy.rpm:
                return "requests_per_minute", retry
        return None

    def charge(self, name: str, tokens: int) -> None:
        window, _ = self._window()
        self.counts[(name, window, "t")] = self.counts.get((name, window, "t"), 0) + tokens


class Quotas:
    def __init__(self, policies: Sequence[KeyPolicy], redis_url: str | None, registry: CollectorRegistry,
                 *, timeout_s: float = 0.5, retry_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.policies = {p.name: p for p in policies}
        self.url = redis_url
        self.redis = connect(redis_url, timeout_s) if redis_url else None
        self._admit = self.redis.register_script(_ADMIT) if self.redis else None
        self._charge = self.redis.register_script(_CHARGE) if self.redis else None
        self.local = LocalWindows()
        self.retry_s, self.clock = retry_s, clock
        self.down_until = 0.0
        self.requests = Counter("llamactl_key_requests", "Inference requests admitted, by API key name.",
                                ["key"], registry=registry)
        self.rejected = Counter("llamactl_key_rejected", "Inference requests refused with 429 for a key's "
                                "limit, by API key name and limit.", ["key", "limit"], registry=registry)
        self.prompt_tokens = Counter("llamactl_key_prompt_tokens", "Prompt tokens of answers, by API key name.",
                                     ["key"], registry=registry)
        self.completion_tokens = Counter("llamactl_key_completion_tokens", "Completion tokens of answers, by "
                                         "API key name.", ["key"], registry=registry)
        up = Gauge("llamactl_quota_shared_up", "1 while quotas are counted cluster-wide in Redis, 0 while this "
                   "instance counts alone (no Redis, or Redis down).", registry=registry)
        up.set_function(lambda: 1.0 if self.shared else 0.0)

    @property
    def shared(self) -> bool:
        return self.redis is not None and self.clock() >= self.down_until

    def describe(self) -> dict[str, Any]:
        state = "redis" if self.shared else ("local (Redis down)" if self.redis is not None else "local")
        return {"state": state, "keys": sorted(self.policies),
                "limited": sorted(n for n, p in self.policies.items() if p.limited)}

    async def admit(self, name: str) -> Refusal | None:
        policy = self.policies.get(name)
        if policy is None:
            return None
        refused: tuple[str, int] | None = None
        if self.shared and self._admit is not None:
            try:
                ok, limit, retry = await self._admit(args=[name, policy.rpm or 0, policy.tpm or 0])
                refused = None if int(ok) else (str(limit), int(retry))
            except (rx.RedisError, OSError) as exc:
                self._failed(exc)
                refused = self.local.admit(policy)
        else:
            refused = self.local.admit(policy)
        if refused is None:
            self.requests.labels(key=name).inc()
            return None
        limit, retry = refused
        self.rejected.labels(key=name, limit=limit).inc()
        value = policy.rpm if limit == "requests_per_minute" else policy.tpm
        return Refusal(limit, int(value or 0), max(1, retry))

    async def charge(self, name: str, prompt_tokens: int, completion_tokens: int) -> None:
        if name not in self.policies or prompt_tokens + completion_tokens <= 0:
            return
        self.prompt_tokens.labels(key=name).inc(prompt_tokens)
        self.completion_tokens.labels(key=name).inc(completion_tokens)
        self.local.charge(name, prompt_tokens + completion_tokens)  # kept too: the fallback starts warm
        if self.shared and self._charge is not None:
            try:
                await self._charge(args=[name, prompt_tokens, completion_tokens])
            except (rx.RedisError, OSError) as exc:
                self._failed(exc)

    def _failed(self, exc: BaseException) -> None:
        if self.shared:
            log.warning("quotas: Redis at %s does not answer (%s); counting on this instance for %gs",
                        where(self.url or ""), type(exc).__name__, self.retry_s)
        self.down_until = self.clock() + self.retry_s

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()
