"""Readiness and drain waits with a fake clock: no real time passes."""

from __future__ import annotations

import pytest

from llamactl.health.wait import Observation, wait_idle, wait_ready


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def scripted(*answers: Observation, cost_s: float = 0.0, time: FakeTime | None = None):  # type: ignore[no-untyped-def]
    seen: list[tuple[str, float]] = []
    queue = list(answers)

    def check(url: str, timeout_s: float) -> Observation:
        seen.append((url, timeout_s))
        if time is not None:
            time.now += min(cost_s, timeout_s)  # a real check never outlives its own timeout
        return queue.pop(0) if len(queue) > 1 else queue[0]

    return check, seen


def test_ready_after_loading() -> None:
    t = FakeTime()
    loading = Observation(False, "loading", "/ready answered 503 (loading)")
    check, seen = scripted(loading, loading, Observation(True, "ready"))
    result = wait_ready("http://127.0.0.1:8000", 60, t.clock, t.sleep, interval_s=2.0, check=check)
    assert result.ok and result.attempts == 3 and result.elapsed_s == 4.0
    assert t.sleeps == [2.0, 2.0]
    assert seen[0] == ("http://127.0.0.1:8000", 5.0)
    assert result.describe("ready", "http://127.0.0.1:8000") == "http://127.0.0.1:8000 ready after 4.0 s"


def test_times_out_without_sleeping_past_the_deadline() -> None:
    t = FakeTime()
    check, seen = scripted(Observation(False, "unreachable", "connection refused"), cost_s=0.5, time=t)
    result = wait_ready("http://u", 10, t.clock, t.sleep, interval_s=3.0, check=check)
    assert not result.ok
    # checks at 0, 3.5 and 7, a sleep cut to the deadline, then one last look bounded by its minimum timeout
    assert [timeout for _, timeout in seen] == [5.0, 5.0, 3.0, 0.05]
    assert t.sleeps == [3.0, 3.0, 2.5]
    assert result.elapsed_s == pytest.approx(10.05)
    assert result.describe("ready", "http://u") == (
        f"http://u not ready after 10.0 s ({result.attempts} checks): connection refused"
    )


def test_failed_server_ends_the_wait_at_once() -> None:
    t = FakeTime()
    check, _ = scripted(Observation(False, "failed", "/ready answered 503 (failed)", fatal=True))
    result = wait_ready("http://u", 600, t.clock, t.sleep, check=check)
    assert not result.ok and result.attempts == 1 and t.sleeps == []


def test_wait_idle_until_in_flight_reaches_zero() -> None:
    t = FakeTime()
    busy = Observation(False, "ready", "2 requests still running")
    check, _ = scripted(busy, busy, busy, Observation(True, "ready"))
    result = wait_idle("http://u", 30, t.clock, t.sleep, interval_s=0.5, check=check)
    assert result.ok and result.attempts == 4 and result.elapsed_s == 1.5


def test_a_lost_host_connection_ends_the_wait_at_once() -> None:
    t = FakeTime()
    silent = Observation(False, "unreachable", "no answer within 5 s")
    check, seen = scripted(silent, cost_s=5.0, time=t)
    looks = iter([True, True, False])
    result = wait_ready("http://u", 900, t.clock, t.sleep, interval_s=1.0, check=check, alive=lambda: next(looks))
    assert not result.ok and len(seen) == 2 and result.elapsed_s == 12.0  # not 900 s
    assert result.describe("ready", "http://u") == (
        "http://u not ready after 12.0 s (3 checks): the SSH connection to the host was lost")
