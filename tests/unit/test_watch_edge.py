"""Pure pieces around watch and logs: probe interpretation, journalctl commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llamactl.cli.logs import units_for
from llamactl.errors import UsageError
from llamactl.health.probe import HttpOutcome, InstanceProbe
from llamactl.inventory import Inventory, load_inventory
from llamactl.ops.watch import observation
from llamactl.plan.units import journal_command

INVENTORY = """\
version: 1
cluster: c1
defaults:
  model: {source: /srv/model}
groups:
  g:
    hosts:
      gpu-01: {address: 10.9.0.1, gpus: 2}
balancer:
  hosts:
    lb: {address: 10.9.0.100}
health: {interval_s: 7}
"""


@pytest.fixture
def inv(tmp_path: Path) -> Inventory:
    (tmp_path / "inventory.yaml").write_text(INVENTORY)
    return load_inventory(tmp_path / "inventory.yaml", env={})


def probe(health: tuple[int | None, object], ready: int | None) -> InstanceProbe:
    code, body = health
    h = HttpOutcome("u/health", code, json.dumps(body) if code else "", None if code else "connection refused", 0.01)
    r = HttpOutcome("u/ready", ready, "{}", None if ready else "connection refused", 0.01)
    return InstanceProbe("u", h, r, HttpOutcome("u/metrics", None, "", "x", 0.0), 0.0)


def test_observation_mapping() -> None:
    assert observation(probe((200, {"status": "ready", "uptime_s": 12}), 200)).outcome == "ready"
    loading = observation(probe((200, {"status": "loading", "uptime_s": 3.5}), 503))
    assert (loading.outcome, loading.uptime_s) == ("loading", 3.5)
    refused = observation(probe((None, None), None))
    assert (refused.outcome, refused.detail) == ("failed", "connection refused")
    failed = observation(probe((200, {"status": "failed", "error": "CUDA out of memory"}), 503))
    assert (failed.outcome, failed.detail) == ("failed", "CUDA out of memory")
    draining = observation(probe((200, {"status": "draining"}), 503))
    assert draining.outcome == "failed" and "draining" in draining.detail
    assert observation(probe((200, {"status": "ready"}), 503)).outcome == "failed"  # both must agree
    assert observation(probe((500, "oops"), None)).outcome == "failed"
    stall = "engine stalled: no step completed for 75.0 s with work waiting (stall_timeout_s 60)"
    stalled = observation(probe((200, {"status": "stalled", "error": stall, "uptime_s": 900}), 503))
    assert (stalled.outcome, stalled.detail, stalled.uptime_s) == ("stalled", stall, 900)
    assert observation(probe((200, {"status": "stalled"}), 503)).detail == "engine stalled"


def test_journal_command() -> None:
    assert journal_command(["llamactl@0.service"], 50, False).shell() == (
        "env SYSTEMD_COLORS=0 journalctl --no-pager -o short-iso -n 50 -u llamactl@0.service")
    follow = journal_command(["a.service", "b.service"], 10, True, color=True).shell()
    assert follow.startswith("env SYSTEMD_COLORS=1 journalctl") and follow.endswith("-u a.service -u b.service -f")


def test_units_for(inv: Inventory) -> None:
    assert units_for(inv, "gpu-01", None) == ["llamactl@0.service", "llamactl@1.service"]
    assert units_for(inv, "gpu-01", 1) == ["llamactl@1.service"]
    assert units_for(inv, "lb", None) == ["nginx.service", "llamactl-watch.service"]
    with pytest.raises(UsageError, match=r"gpu-9: no such host in .*inventory.yaml \(hosts: gpu-01, lb \(balancer\)\)"):
        units_for(inv, "gpu-9", None)
    with pytest.raises(UsageError, match=r"gpu-01: no instance 5 \(instances: 0, 1\)"):
        units_for(inv, "gpu-01", 5)
