"""A deploy's result without a host: ok, the count of changes, the summary's rows and the failure message."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from llamactl.cli.deploy import _summary
from llamactl.errors import OperationFailed
from llamactl.ops.deploy_result import DeployResult, HostOutcome, raise_for
from llamactl.ops.redis import RedisOutcome
from llamactl.plan.deploy import HostPlan


def summary(result: DeployResult) -> list[str]:
    buf = io.StringIO()
    _summary(Console(file=buf, width=120, no_color=True, color_system=None), result)
    return [line.rstrip() for line in buf.getvalue().splitlines()]


def rows(result: DeployResult) -> list[list[str]]:
    """The table's rows below its header, cell by cell."""
    return [[cell.strip() for cell in line.split("│")[1:-1]] for line in summary(result) if line.startswith("│")]


def done(name: str, *changes: str) -> HostOutcome:
    return HostOutcome(name, ok=True, plan=HostPlan(name, changes=list(changes)), duration_s=1.0)


def test_every_step_ok() -> None:
    result = DeployResult("r1", False, [done("gpu-1", "a", "b")], balancer_changed=True,
                          watch_changes=["started watch"], redis=RedisOutcome("lb", ["started redis"]),
                          prometheus_changes={"lb": ["x", "y"]}, vip={"address": "10.0.0.100", "holder": "lb"},
                          vip_changed=True)
    assert result.ok and result.changed == 2 + 1 + 1 + 1 + 2 + 1
    assert rows(result) == [
        ["gpu-1", "ok", "2", "1.0s", "a; b"],
        ["balancer", "ok", "1", "", "config updated"],
        ["vip", "ok", "1", "", "10.0.0.100 held by lb (keepalived updated)"],
        ["watch service", "ok", "1", "", "started watch"],
        ["redis", "ok", "1", "", "started redis"],
        ["prometheus", "ok", "2", "", "lb: x; lb: y"],
    ]
    assert summary(result)[-1] == "8 change(s) in 0.0s"
    raise_for(result)


def test_failed_steps_in_the_message_and_the_json() -> None:
    result = DeployResult("r2", False, [done("gpu-1")], balancer_error="nginx -t failed",
                          rolling_error="canary failed", redis_error="no AUTH", vip_error="no keepalived")
    assert not result.ok and result.changed == 0
    assert rows(result) == [
        ["gpu-1", "ok", "0", "1.0s", ""],
        ["balancer", "failed", "0", "", "nginx -t failed"],
        ["vip", "failed", "0", "", "no keepalived"],
        ["rolling restart", "failed", "", "", "canary failed"],
        ["redis", "failed", "0", "", "no AUTH"],
    ]
    with pytest.raises(OperationFailed) as caught:
        raise_for(result)
    assert str(caught.value) == ("deploy failed: rolling restart (canary failed); balancer (nginx -t failed); "
                                 "redis (no AUTH); vip (no keepalived)")
    doc = result.to_json()
    assert list(doc) == ["ok", "dry_run", "release", "changed", "duration_s", "hosts", "balancer",
                         "rolling_restart_error", "watch", "prometheus", "drained", "transfer", "redis", "vip"]
    assert doc["redis"] == {"host": None, "changes": [], "error": "no AUTH"}
    assert doc["vip"] == {"error": "no keepalived"}
    json.dumps(doc)
