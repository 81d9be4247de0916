"""Pure parts of a lab with two or more balancer hosts: their addresses, the VIP, and an inventory that loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llamactl.errors import UsageError
from llamactl.inventory import load_inventory
from llamactl.lab import inventory
from llamactl.lab.state import plan_state


def test_second_balancer_and_vip_sit_near_the_top() -> None:
    s = plan_state("lab", "10.203.0.0/24", Path("/d"), 3, balancers=2)
    assert [(h.name, h.role, h.address, h.netns, h.veth) for h in s.balancers] == [
        ("lab-lb", "balancer", "10.203.0.10", "lab-lb", "vlab-lb"),
        ("lab-lb2", "balancer", "10.203.0.251", "lab-lb2", "vlab-lb2"),
    ]
    assert s.vip == "10.203.0.250" and [h.address for h in s.servers] == ["10.203.0.11", "10.203.0.12", "10.203.0.13"]
    assert inventory.endpoint(s) == "http://10.203.0.250:80"
    assert "10.203.0.251\tlab-lb2" in inventory.hosts_file(s)


def test_one_balancer_has_no_vip() -> None:
    s = plan_state("lab", "10.203.0.0/24", Path("/d"), 3)
    assert s.vip is None and len(s.balancers) == 1
    assert "vip" not in inventory.build_inventory(s)["balancer"]


def test_lab_inventory_with_a_vip_loads(tmp_path: Path) -> None:
    s = plan_state("lab", "10.203.0.0/24", tmp_path, 2, balancers=3)
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump(inventory.build_inventory(s), sort_keys=False))
    (tmp_path / inventory.REDIS_PASSWORD).write_text("lab-redis-password-0123456789\n")  # what `lab up` writes
    inv = load_inventory(path, env={})
    assert [(b.name, b.address) for b in inv.balancer.hosts] == [
        ("lab-lb", "10.203.0.10"), ("lab-lb2", "10.203.0.251"), ("lab-lb3", "10.203.0.252")]
    assert inv.balancer.vip is not None and (inv.balancer.vip.address, inv.balancer.vip.prefix) == ("10.203.0.250", 24)
    assert inv.endpoint == "http://10.203.0.250:80"


@pytest.mark.parametrize(("subnet", "count", "balancers", "message"), [
    ("10.203.0.0/24", 1, 4, "--balancers 4: expected 1 to 3 balancer hosts"),
    ("10.203.0.0/27", 16, 2, "--subnet 10.203.0.0/27: too small for 16 hosts and a VIP with 2 balancers"),
])
def test_bad_balancer_counts(subnet: str, count: int, balancers: int, message: str) -> None:
    with pytest.raises(UsageError) as err:
        plan_state("lab", subnet, Path("/d"), count, balancers)
    assert str(err.value) == message
