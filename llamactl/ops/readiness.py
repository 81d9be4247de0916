"""Wait for several instances' /ready at once (deploy), on top of llamactl.health.wait."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from llamactl.health.wait import Alive, wait_ready


def wait_instances_ready(urls: list[str], *, timeout_s: float, interval_s: float = 0.25,
                         alive: Alive | None = None) -> dict[str, str]:
    """Poll every URL's /ready until 200, the timeout, or ``alive`` (the host's connection) turning False.
    Returns {url: reason} for those never ready."""
    if not urls:
        return {}
    with ThreadPoolExecutor(max_workers=len(urls)) as pool:
        results = list(pool.map(lambda u: wait_ready(u, timeout_s, interval_s=interval_s, alive=alive), urls))
    return {u: r.describe("ready", u) for u, r in zip(urls, results) if not r.ok}
