"""Concurrent HTTP probes of server instances and balancers (the edge of status; no interpretation here).

Every probe runs under its own deadline and all of them run at once, so a silent host costs one
timeout for the whole sweep rather than one per host. Interpreting answers is ``report``'s job.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

PROBE_PATHS = ("/health", "/ready", "/metrics")


@dataclass(frozen=True)
class HttpOutcome:
    """One GET: the status and body when the server answered, else why it did not."""

    url: str
    status: int | None
    text: str
    error: str | None
    elapsed_s: float
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def answered(self) -> bool:
        return self.status is not None


@dataclass(frozen=True)
class InstanceProbe:
    """The three probes of one instance, taken together at monotonic time ``at``."""

    url: str
    health: HttpOutcome
    ready: HttpOutcome
    metrics: HttpOutcome
    at: float


def make_client(targets: int, timeout_s: float, *, verify: bool = True) -> httpx.AsyncClient:
    """The sweep's client: httpx's API over the lean asyncio transport (see ``transport``).

    Pool limits are sized for every probe of a sweep at once (3 per instance), so none waits for a slot.
    ``trust_env=False``: a proxy from the environment must never sit between us and the cluster.
    """
    from llamactl.health.transport import AsyncioTransport

    connections = max(32, targets * len(PROBE_PATHS) + 8)
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout_s),
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        transport=AsyncioTransport(verify=verify, max_idle_per_origin=len(PROBE_PATHS) + 1),
        trust_env=False,
        follow_redirects=False,
    )


def root_os_error(exc: BaseException) -> OSError | None:
    """The innermost OSError behind an httpx error (anyio wraps it as "All connection attempts failed")."""
    found: OSError | None = None
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            found = seen
        seen = seen.__cause__ or seen.__context__
    return found


def describe_error(exc: BaseException, timeout_s: float) -> str:
    """A short human reason for a failed request, without library internals."""
    if isinstance(exc, (asyncio.TimeoutError, httpx.TimeoutException)):
        return f"no answer within {timeout_s:g} s"
    if isinstance(exc, httpx.ConnectError):
        cause = root_os_error(exc)
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if cause is not None and cause.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            return "host unreachable"
        return f"cannot connect: {cause.strerror or cause}" if cause is not None else f"cannot connect: {exc}"
    if isinstance(exc, httpx.RemoteProtocolError):
        return str(exc) or "connection closed without an answer"
    if isinstance(exc, httpx.HTTPError):
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return f"{type(exc).__name__}: {exc}"


async def fetch(client: httpx.AsyncClient, url: str, timeout_s: float) -> HttpOutcome:
    """GET ``url`` with a hard deadline (httpx's timeouts are per phase; wait_for bounds the total)."""
    start = time.monotonic()
    try:
        response = await asyncio.wait_for(client.get(url, timeout=timeout_s), timeout_s)
    except (httpx.HTTPError, asyncio.TimeoutError, OSError) as exc:
        return HttpOutcome(url, None, "", describe_error(exc, timeout_s), time.monotonic() - start)
    headers = tuple((k.lower(), v) for k, v in response.headers.items())
    return HttpOutcome(url, response.status_code, response.text, None, time.monotonic() - start, headers)


async def probe_instance(client: httpx.AsyncClient, base_url: str, timeout_s: float) -> InstanceProbe:
    """/health, then /ready and /metrics on the same keep-alive connection; an instance that gave no HTTP
    answer to /health is not asked again (its other probes carry the same error).

    One connection per instance instead of three: at 1,000 instances, opening 3,000 connections at once kept
    a 2-core controller's event loop busy past the 1 s timeout, so every probe timed out (bench/status_sweep.py).
    The price: an instance that answers, but slowly, may take up to three timeouts."""
    base = base_url.rstrip("/")
    health = await fetch(client, base + PROBE_PATHS[0], timeout_s)
    if health.status is None:
        ready, metrics = (dataclasses.replace(health, url=base + p) for p in PROBE_PATHS[1:])
    else:
        ready = await fetch(client, base + PROBE_PATHS[1], timeout_s)
        metrics = await fetch(client, base + PROBE_PATHS[2], timeout_s)
    return InstanceProbe(base, health, ready, metrics, time.monotonic())


async def probe_instances(
    client: httpx.AsyncClient, base_urls: Sequence[str], timeout_s: float
) -> list[InstanceProbe]:
    """Probe every instance at once; results keep the order of ``base_urls``."""
    return list(await asyncio.gather(*(probe_instance(client, u, timeout_s) for u in base_urls)))


async def probe_balancers(
    client: httpx.AsyncClient, base_urls: Sequence[str], timeout_s: float
) -> list[HttpOutcome]:
    """``GET <endpoint>/healthz`` on each balancer (nginx answers it itself, without a backend)."""
    return list(
        await asyncio.gather(*(fetch(client, u.rstrip("/") + "/healthz", timeout_s) for u in base_urls))
    )
