"""Wait for several instances' /ready at once (deploy and restarts)."""

from __future__ import annotations

import asyncio
import time

import httpx


async def _wait_one(client: httpx.AsyncClient, url: str, deadline: float, interval_s: float) -> str | None:
    last = "no answer"
    while True:
        try:
            resp = await client.get(f"{url}/ready")
            if resp.status_code == 200:
                return None
            try:
                last = f"/ready answered {resp.status_code} ({resp.json().get('status', '?')})"
            except ValueError:
                last = f"/ready answered {resp.status_code}"
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if time.monotonic() >= deadline:
            return f"not ready after the timeout; last: {last}"
        await asyncio.sleep(interval_s)


async def _wait_all(urls: list[str], timeout_s: float, interval_s: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=httpx.Timeout(5.0), trust_env=False) as client:
        results = await asyncio.gather(*[_wait_one(client, u, deadline, interval_s) for u in urls])
    return {u: r for u, r in zip(urls, results) if r is not None}


def wait_instances_ready(urls: list[str], *, timeout_s: float, interval_s: float = 0.25) -> dict[str, str]:
    """Poll every URL's /ready until 200 or the timeout. Returns {url: reason} for those never ready."""
    if not urls:
        return {}
    return asyncio.run(_wait_all(urls, timeout_s, interval_s))
