"""The Redis connection: short timeouts, one immediate retry (a pooled connection that a Redis restart closed
is replaced, not reported), plain error messages."""

from __future__ import annotations

from urllib.parse import urlsplit

from redis import exceptions as rx
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

# What "Redis is not there right now" looks like; anything else is a bug worth a traceback.
DOWN = (rx.ConnectionError, rx.TimeoutError, rx.BusyLoadingError, ConnectionError, TimeoutError)


class StateUnavailable(Exception):
    """Redis cannot take or answer the request now (down, loading, or out of memory)."""


def where(url: str) -> str:
    """host:port of a Redis URL, never its password (for messages and logs)."""
    parts = urlsplit(url)
    return f"{parts.hostname or '127.0.0.1'}:{parts.port or 6379}"


def connect(url: str, timeout_s: float = 5.0) -> Redis:
    return Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 1),
        decode_responses=True,
    )


def unavailable(exc: BaseException, url: str) -> StateUnavailable:
    """The plain message for a Redis failure (the exception's own text may carry internals)."""
    if isinstance(exc, rx.ResponseError) and str(exc).startswith("OOM"):
        return StateUnavailable(f"the job store (Redis at {where(url)}) is full; retry later")
    if isinstance(exc, rx.AuthenticationError):
        return StateUnavailable(f"the job store (Redis at {where(url)}) refused this server's password")
    return StateUnavailable(f"the job store (Redis at {where(url)}) is unreachable; retry later")


def is_down(exc: BaseException) -> bool:
    """Failures to wait out: unreachable, loading, out of memory, or a password it does not take (yet)."""
    if isinstance(exc, (rx.AuthenticationError, *DOWN)):
        return True
    return isinstance(exc, rx.ResponseError) and str(exc).startswith(("OOM", "LOADING"))
