"""Readiness and drain waits with an injected clock and sleep, so tests run them without real time.

Used by rolling restart and watch (thread-based callers), hence blocking. Each attempt is one HTTP
request bounded by the time left; a server reporting ``failed`` ends the wait at once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

Clock = Callable[[], float]
Sleep = Callable[[float], None]


@dataclass(frozen=True)
class Observation:
    """One look at an instance: whether the awaited condition holds, and what was seen."""

    done: bool
    status: str  # server status (ready/loading/draining/failed) or "unreachable"
    error: str | None = None
    fatal: bool = False  # no point waiting longer (the server says it failed)


@dataclass(frozen=True)
class WaitResult:
    ok: bool
    elapsed_s: float
    attempts: int
    last: Observation

    def describe(self, what: str, url: str) -> str:
        if self.ok:
            return f"{url} {what} after {self.elapsed_s:.1f} s"
        reason = self.last.error or self.last.status
        return f"{url} not {what} after {self.elapsed_s:.1f} s ({self.attempts} checks): {reason}"


Check = Callable[[str, float], Observation]
Alive = Callable[[], bool]

# What a wait sees once the host's SSH connection is gone: its HTTP port may simply stay silent (no RST from a
# vanished host), and waiting out the whole timeout would hold up everything behind it.
CONNECTION_LOST = Observation(False, "unreachable", "the SSH connection to the host was lost", fatal=True)


def _get_json(url: str, timeout_s: float) -> tuple[int, dict[str, object]]:
    with httpx.Client(trust_env=False, timeout=timeout_s) as client:
        response = client.get(url)
    try:
        body = json.loads(response.text)
    except ValueError:
        body = {}
    return response.status_code, body if isinstance(body, dict) else {}


def _count(value: object) -> int:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


def check_ready(url: str, timeout_s: float) -> Observation:
    """GET /ready: 200 means ready; a 503 carries the server's status."""
    try:
        code, body = _get_json(url.rstrip("/") + "/ready", timeout_s)
    except httpx.HTTPError as exc:
        from llamactl.health.probe import describe_error

        return Observation(False, "unreachable", describe_error(exc, timeout_s))
    status = str(body.get("status", "ready" if code == 200 else f"HTTP {code}"))
    return Observation(
        code == 200,
        status,
        None if code == 200 else f"/ready answered {code} ({status})",
        fatal=status == "failed",
    )


def check_idle(url: str, timeout_s: float) -> Observation:
    """GET /health: done when nothing is in flight or queued (a drained instance finished its work)."""
    try:
        code, body = _get_json(url.rstrip("/") + "/health", timeout_s)
    except httpx.HTTPError as exc:
        from llamactl.health.probe import describe_error

        # A server that stopped has no work left either; restart's own checks catch a real failure.
        return Observation(True, "unreachable", describe_error(exc, timeout_s))
    busy = _count(body.get("in_flight")) + _count(body.get("queued"))
    status = str(body.get("status", f"HTTP {code}"))
    return Observation(
        code == 200 and busy == 0, status, None if busy == 0 else f"{busy} requests still running"
    )


def wait_until(
    url: str,
    check: Check,
    timeout_s: float,
    *,
    clock: Clock = time.monotonic,
    sleep: Sleep = time.sleep,
    interval_s: float = 1.0,
    attempt_timeout_s: float = 5.0,
    alive: Alive | None = None,
) -> WaitResult:
    """Call ``check`` every ``interval_s`` until it holds, says it never will, or ``timeout_s`` passes.
    ``alive``: the host's connection; once it is lost the wait ends at once (CONNECTION_LOST)."""
    start = clock()
    attempts = 0
    while True:
        left = timeout_s - (clock() - start)
        attempts += 1
        if alive is not None and not alive():
            return WaitResult(False, clock() - start, attempts, CONNECTION_LOST)
        seen = check(url, max(0.05, min(attempt_timeout_s, left)))
        elapsed = clock() - start
        if seen.done:
            return WaitResult(True, elapsed, attempts, seen)
        if seen.fatal or elapsed >= timeout_s:
            return WaitResult(False, elapsed, attempts, seen)
        sleep(min(interval_s, timeout_s - elapsed))


def wait_ready(
    url: str,
    timeout_s: float,
    clock: Clock = time.monotonic,
    sleep: Sleep = time.sleep,
    *,
    interval_s: float = 1.0,
    check: Check = check_ready,
    alive: Alive | None = None,
) -> WaitResult:
    """Wait for ``url``'s /ready to answer 200 (while ``alive``, the host's connection, holds)."""
    return wait_until(url, check, timeout_s, clock=clock, sleep=sleep, interval_s=interval_s, alive=alive)


def wait_idle(
    url: str,
    timeout_s: float,
    clock: Clock = time.monotonic,
    sleep: Sleep = time.sleep,
    *,
    interval_s: float = 0.5,
    check: Check = check_idle,
) -> WaitResult:
    """Wait until ``url`` has no request in flight or queued (after it was drained from the balancer)."""
    return wait_until(url, check, timeout_s, clock=clock, sleep=sleep, interval_s=interval_s)
