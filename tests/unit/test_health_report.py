"""HealthReport computation from probe results: states, drift, rates, latency, exit decision (pure)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from llamactl.health.canary import CanaryResult
from llamactl.health.probe import HttpOutcome, InstanceProbe
from llamactl.health.report import Target, balancer_report, health_report, instance_report
from llamactl.health.systemd import SystemdState

METRICS = (Path(__file__).parents[1] / "health" / "data" / "server_metrics.txt").read_text()
URL = "http://127.0.0.5:8001"
TARGET = Target("gpu-01/1", "gpu-01", 1, 1, "127.0.0.5", 8001, URL, expected_config_hash="abcd1234abcd1234")


def health(status: str = "ready", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "status": status, "model": "/srv/models/Llama-3.2V-11B-cot", "version": "0.1.0",
        "config_hash": "abcd1234abcd1234", "instance": "gpu-01/1", "in_flight": 3, "queued": 1,
        "gpu_memory": {"used_bytes": 20 * 2**30, "total_bytes": 80 * 2**30}, "uptime_s": 100.0, "error": None,
    }  # fmt: skip
    body.update(extra)
    return body


def ok(path: str, body: Any, status: int = 200) -> HttpOutcome:
    text = body if isinstance(body, str) else json.dumps(body)
    return HttpOutcome(URL + path, status, text, None, 0.01)


def failed(path: str, error: str) -> HttpOutcome:
    return HttpOutcome(URL + path, None, "", error, 1.0)


def probe(
    h: HttpOutcome | None = None,
    r: HttpOutcome | None = None,
    mx: HttpOutcome | None = None,
    at: float = 50.0,
) -> InstanceProbe:
    return InstanceProbe(
        URL,
        h or ok("/health", health()),
        r or ok("/ready", {"ready": True}),
        mx or ok("/metrics", METRICS),
        at,
    )


def test_ready_instance_carries_every_column() -> None:
    rep = instance_report(TARGET, probe(), "0.1.0")
    assert rep.state == "ready"
    assert (rep.model, rep.version, rep.config_hash) == (
        "/srv/models/Llama-3.2V-11B-cot",
        "0.1.0",
        "abcd1234abcd1234",
    )
    assert not rep.drift and rep.drift_reasons == []
    assert (rep.in_flight, rep.queued) == (3, 1)
    assert (rep.gpu_memory_used_bytes, rep.gpu_memory_total_bytes) == (20 * 2**30, 80 * 2**30)
    # one scrape: 10 requests over 100 s of uptime; latency from the lifetime histogram
    assert rep.requests_per_s == pytest.approx(0.1) and rep.rate_window_s is None
    assert rep.p50_s == pytest.approx(1.5) and rep.p95_s == pytest.approx(7.5)
    assert rep.last_error is None
    assert rep.healthy(canary_required=False)


@pytest.mark.parametrize("status", ["loading", "draining"])
def test_loading_and_draining_are_reported_as_such(status: str) -> None:
    not_ready = ok("/ready", {"ready": False, "status": status}, 503)
    rep = instance_report(TARGET, probe(h=ok("/health", health(status)), r=not_ready), "0.1.0")
    assert rep.state == status and rep.last_error is None
    assert not rep.healthy(canary_required=False)
    # /health answered before the state changed, /ready after: the later answer wins.
    assert instance_report(TARGET, probe(r=not_ready), "0.1.0").state == status


def test_failed_server_is_down_with_its_error() -> None:
    h = ok("/health", health("failed", error="CUDA out of memory while loading"))
    rep = instance_report(
        TARGET, probe(h=h, r=ok("/ready", {"ready": False, "status": "failed"}, 503)), "0.1.0"
    )
    assert rep.state == "down"
    assert rep.last_error == "server failed: CUDA out of memory while loading"


def test_silent_instance_is_down_with_the_probe_error() -> None:
    silent = probe(failed("/health", "no answer within 1 s"), failed("/ready", "x"), failed("/metrics", "x"))
    rep = instance_report(TARGET, silent, "0.1.0")
    assert rep.state == "down"
    assert rep.last_error == "GET /health: no answer within 1 s"
    assert rep.model is None and rep.p50_s is None and not rep.drift


STALL = "engine stalled: no step completed for 75.0 s with work waiting (stall_timeout_s 60)"


def test_stalled_server_is_not_ready_and_says_why() -> None:
    stalled_ready = ok("/ready", {"ready": False, "status": "stalled"}, 503)
    stalled = ok("/health", health("stalled", error=STALL))
    rep = instance_report(TARGET, probe(h=stalled, r=stalled_ready), "0.1.0")
    assert rep.state == "stalled" and rep.last_error == f"server: {STALL}"
    assert (rep.in_flight, rep.queued, rep.model) == (3, 1, "/srv/models/Llama-3.2V-11B-cot")
    assert not rep.healthy(canary_required=False)
    report = health_report([rep], [], "0.1.0", 0.1)
    assert not report.ok and report.summary() == "0/1 instances ready, swept in 0.10 s"
    assert json.loads(report.to_json())["instances"][0]["state"] == "stalled"
    # a server that gives no reason still gets one
    bare = instance_report(TARGET, probe(h=ok("/health", health("stalled")), r=stalled_ready), "0.1.0")
    assert bare.state == "stalled"
    assert bare.last_error == "engine stalled: no step progress with work waiting"


def test_health_ready_then_ready_probe_stalled_is_stalled() -> None:
    # /health answered just before the stall timeout passed, /ready just after
    rep = instance_report(TARGET, probe(r=ok("/ready", {"ready": False, "status": "stalled"}, 503)), "0.1.0")
    assert rep.state == "stalled" and rep.last_error == "engine stalled: no step progress with work waiting"


def test_health_ready_but_ready_probe_failing_is_down() -> None:
    rep = instance_report(
        TARGET, probe(r=ok("/ready", {"error": {"message": "boom", "type": "x"}}, 500)), "0.1.0"
    )
    assert rep.state == "down"
    assert rep.last_error == "GET /ready: HTTP 500: boom"


def test_health_answer_that_is_not_json_is_down() -> None:
    rep = instance_report(TARGET, probe(h=ok("/health", "<html>hi</html>")), "0.1.0")
    assert rep.state == "down" and rep.last_error == "GET /health: answer is not a JSON object"


def test_unknown_server_status_is_down() -> None:
    rep = instance_report(TARGET, probe(h=ok("/health", health("sleeping"))), "0.1.0")
    assert rep.state == "down" and rep.last_error == "GET /health: unknown status 'sleeping'"


def test_drift_on_version_and_config_hash() -> None:
    h = ok("/health", health(version="0.0.9", config_hash="ffff0000ffff0000"))
    rep = instance_report(TARGET, probe(h=h), "0.1.0")
    assert rep.drift
    assert rep.drift_reasons == ["version 0.0.9 != 0.1.0", "config ffff0000ffff0000 != abcd1234abcd1234"]
    assert rep.state == "ready"  # drift is shown, it does not make an instance unready


def test_unknown_expected_hash_checks_only_the_version() -> None:
    target = Target("h/0", "h", 0, None, "127.0.0.5", 8001, URL, expected_config_hash=None)
    rep = instance_report(target, probe(h=ok("/health", health(config_hash="anything"))), "0.1.0")
    assert not rep.drift


def test_server_error_field_is_the_last_error_of_a_ready_instance() -> None:
    rep = instance_report(TARGET, probe(h=ok("/health", health(error="request 12 timed out"))), "0.1.0")
    assert rep.state == "ready" and rep.last_error == "server: request 12 timed out"


def _metrics(count: int, le1: int) -> str:
    return (
        f'llamactl_e2e_request_latency_seconds_bucket{{le="1.0"}} {le1}\n'
        f'llamactl_e2e_request_latency_seconds_bucket{{le="2.0"}} {count}\n'
        f'llamactl_e2e_request_latency_seconds_bucket{{le="+Inf"}} {count}\n'
        f"llamactl_e2e_request_latency_seconds_count {count}\n"
        f"llamactl_e2e_request_latency_seconds_sum {count}\n"
    )


def test_two_scrapes_give_the_rate_and_latency_of_the_window() -> None:
    first = probe(mx=ok("/metrics", _metrics(100, 100)), at=10.0)
    # 20 requests in 5 s, all slower than 1 s: the lifetime p50 would stay under 1 s.
    second = probe(mx=ok("/metrics", _metrics(120, 100)), at=15.0)
    rep = instance_report(TARGET, second, "0.1.0", previous=first)
    assert rep.requests_per_s == pytest.approx(4.0) and rep.rate_window_s == pytest.approx(5.0)
    assert rep.p50_s == pytest.approx(1.5)


def test_quiet_window_has_zero_rate_and_keeps_lifetime_latency() -> None:
    first = probe(mx=ok("/metrics", _metrics(100, 50)), at=10.0)
    second = probe(mx=ok("/metrics", _metrics(100, 50)), at=15.0)
    rep = instance_report(TARGET, second, "0.1.0", previous=first)
    assert rep.requests_per_s == 0.0
    assert rep.p50_s == pytest.approx(1.0)


def test_restart_between_scrapes_falls_back_to_uptime_average() -> None:
    first = probe(mx=ok("/metrics", _metrics(500, 500)), at=10.0)
    second = probe(mx=ok("/metrics", _metrics(20, 10)), at=15.0)
    rep = instance_report(TARGET, second, "0.1.0", previous=first)
    assert rep.rate_window_s is None and rep.requests_per_s == pytest.approx(20 / 100.0)


def test_bad_metrics_text_is_reported_without_losing_health() -> None:
    rep = instance_report(TARGET, probe(mx=ok("/metrics", "garbage{ 1\n")), "0.1.0")
    assert rep.state == "ready" and rep.in_flight == 3 and rep.p50_s is None
    assert rep.last_error is not None and rep.last_error.startswith("GET /metrics: line 1:")


def test_gauges_fall_back_to_metrics_when_health_lacks_them() -> None:
    h = ok("/health", health(in_flight=None, queued=None, gpu_memory=None))
    rep = instance_report(TARGET, probe(h=h), "0.1.0")
    assert (rep.in_flight, rep.queued) == (2, 5)
    assert rep.gpu_memory_total_bytes == 85_000_000_000


def test_canary_and_systemd_results_are_attached() -> None:
    bad = CanaryResult(False, 2.0, "the answer has no conclusion stage")
    state = SystemdState("llamactl@1.service", "active", "running", 4)
    rep = instance_report(TARGET, probe(), "0.1.0", canary=bad, systemd=state)
    assert rep.systemd == state and not rep.healthy(canary_required=True)
    assert rep.last_error == "canary: the answer has no conclusion stage"
    good = instance_report(TARGET, probe(), "0.1.0", canary=CanaryResult(True, 1.0, None, "red", 2))
    assert good.healthy(canary_required=True) and good.last_error is None


def test_report_ok_needs_every_instance_and_balancer_ready() -> None:
    ready = instance_report(TARGET, probe(), "0.1.0")
    loading = instance_report(TARGET, probe(h=ok("/health", health("loading"))), "0.1.0")
    lb_up = balancer_report("lb", HttpOutcome("http://127.0.0.2:80/healthz", 200, "ok", None, 0.01))
    lb_down = balancer_report(
        "lb", HttpOutcome("http://127.0.0.2:80/healthz", None, "", "connection refused", 0.0)
    )
    assert lb_up.state == "ready" and lb_down.state == "down" and lb_down.error == "connection refused"
    assert health_report([ready, ready], [lb_up], "0.1.0", 0.2).ok
    assert not health_report([ready, loading], [lb_up], "0.1.0", 0.2).ok
    assert not health_report([ready], [lb_down], "0.1.0", 0.2).ok
    assert not health_report([ready], [lb_up], "0.1.0", 0.2, canary=True).ok  # canary asked, none ran
    summary = health_report([ready, loading], [lb_up], "0.1.0", 0.25).summary()
    assert summary == "1/2 instances ready, 1/1 balancers ready, swept in 0.25 s"


def test_json_report_is_complete_and_serialisable() -> None:
    rep = instance_report(
        TARGET, probe(), "0.1.0", systemd=SystemdState("llamactl@1.service", "active", "running", 0)
    )
    doc = json.loads(health_report([rep], [], "0.1.0", 0.1, deep=True).to_json())
    assert doc["ok"] is True and doc["expected_version"] == "0.1.0"
    inst = doc["instances"][0]
    assert inst["id"] == "gpu-01/1" and inst["state"] == "ready" and inst["p95_s"] == pytest.approx(7.5)
    assert inst["systemd"] == {
        "unit": "llamactl@1.service", "active_state": "active", "sub_state": "running", "restarts": 0, "error": None,
    }  # fmt: skip
