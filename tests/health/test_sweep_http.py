"""The sweep over real loopback sockets: states, errors, and that silent hosts cost one timeout in parallel."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from llamactl.health.probe import make_client
from llamactl.health.report import Target
from llamactl.health.simulate import Behaviour, Endpoint, running
from llamactl.health.sweep import SweepOptions, SweepPlan, sweep
from tests.health.helpers import free_base_port

ADDR = "127.0.0.21"


def _plan(base: int, count: int) -> SweepPlan:
    targets = [
        Target(
            f"h/{i}",
            "h",
            i,
            i,
            ADDR,
            base + i,
            f"http://{ADDR}:{base + i}",
            expected_config_hash="0123456789abcdef",
        )
        for i in range(count)
    ]
    return SweepPlan(targets, [("lb", f"http://127.0.0.2:{base + count}")])


def _sweep(plan: SweepPlan, timeout_s: float, canary: bool = False) -> tuple[float, object]:
    async def go() -> object:
        async with make_client(len(plan.targets), timeout_s) as client:
            report, _ = await sweep(plan, SweepOptions(timeout_s=timeout_s, canary=canary), client)
            return report

    start = time.monotonic()
    report = asyncio.run(go())
    return time.monotonic() - start, report


def test_every_state_and_failure_in_one_sweep() -> None:
    base = free_base_port([ADDR, "127.0.0.2"], 13)
    kinds = ["ready", "loading", "draining", "failed", "silent", "silent", "silent", "silent", "slow", "refused",
             "drift", "stalled"]  # fmt: skip
    endpoints = []
    for i, kind in enumerate(kinds):
        if kind == "refused":
            continue  # nothing listens there
        scripted = kind in ("loading", "draining", "failed", "stalled", "silent")
        b = Behaviour(status=kind if scripted else "ready", requests=40)
        if kind == "slow":
            b.delay_s = 0.3
        if kind == "drift":
            b.version = "0.0.1"
        endpoints.append(Endpoint(ADDR, base + i, b))
    endpoints.append(Endpoint("127.0.0.2", base + len(kinds), Behaviour(status="balancer")))
    plan = _plan(base, len(kinds))
    with running(endpoints):
        wall, report = _sweep(plan, timeout_s=1.0)
    # Four silent instances: a series would take 4+ s; in parallel they cost one 1 s timeout.
    assert 1.0 <= wall < 1.8, wall
    states = {r.id: r.state for r in report.instances}  # type: ignore[attr-defined]
    assert [states[f"h/{i}"] for i in range(len(kinds))] == [
        "ready", "loading", "draining", "down", "down", "down", "down", "down", "ready", "down", "ready",
        "stalled",
    ]  # fmt: skip
    by_id = {r.id: r for r in report.instances}  # type: ignore[attr-defined]
    assert by_id["h/3"].last_error == "server failed: weights missing"
    assert by_id["h/4"].last_error == "GET /health: no answer within 1 s"
    assert by_id["h/9"].last_error == "GET /health: connection refused"
    assert by_id["h/11"].last_error == (
        "server: engine stalled: no step completed for 75.0 s with work waiting (stall_timeout_s 60)"
    )
    assert by_id["h/10"].drift and by_id["h/10"].drift_reasons[0].startswith("version 0.0.1 != ")
    assert not by_id["h/0"].drift
    assert by_id["h/0"].p50_s is not None and by_id["h/0"].requests_per_s == 0.4
    assert by_id["h/0"].gpu_memory_total_bytes == 80 * 2**30
    assert [b.state for b in report.balancers] == ["ready"]  # type: ignore[attr-defined]
    assert not report.ok  # type: ignore[attr-defined]


def test_all_ready_cluster_is_ok_and_fast() -> None:
    base = free_base_port([ADDR, "127.0.0.2"], 9)
    endpoints = [Endpoint(ADDR, base + i) for i in range(8)]
    endpoints.append(Endpoint("127.0.0.2", base + 8, Behaviour(status="balancer")))
    with running(endpoints):
        wall, report = _sweep(_plan(base, 8), timeout_s=2.0, canary=True)
    assert report.ok, report.summary()  # type: ignore[attr-defined]
    assert wall < 1.0
    assert all(r.canary.ok and r.canary.conclusion == "It is a red square." for r in report.instances)  # type: ignore[attr-defined]


def test_canary_catches_an_answer_without_stages(tmp_path: Path) -> None:
    base = free_base_port([ADDR, "127.0.0.2"], 3)
    broken = Behaviour(answer={"text": "no stages here"})
    endpoints = [Endpoint(ADDR, base), Endpoint(ADDR, base + 1, broken)]
    endpoints.append(Endpoint("127.0.0.2", base + 2, Behaviour(status="balancer")))
    with running(endpoints):
        _, report = _sweep(_plan(base, 2), timeout_s=2.0, canary=True)
    first, second = report.instances  # type: ignore[attr-defined]
    assert first.canary.ok and not second.canary.ok
    assert second.canary.error == "result.summary is not a string"
    assert second.last_error == "canary: result.summary is not a string"
    assert not report.ok  # type: ignore[attr-defined]
