"""What a sweep probes, taken from a real inventory file (pure: no sockets)."""

from __future__ import annotations

from pathlib import Path

from llamactl.health.sweep import balancer_endpoints, expected_config_hash, plan_from_inventory
from llamactl.inventory import expected_env, load_inventory
from llamactl.server.settings import Settings

INVENTORY = """version: 1
cluster: t
defaults:
  gpus: 2
  base_port: 9000
  model: {source: /srv/models/m}
groups:
  g:
    hosts:
      a: {address: 127.0.0.71}
      b: {address: 127.0.0.72, gpus: 0}
balancer:
  hosts:
    lb1: {address: 127.0.0.2}
    lb2: {address: 127.0.0.3}
  listen: 8080
"""


def _inv(tmp_path: Path, text: str = INVENTORY) -> Path:
    path = tmp_path / "inventory.yaml"
    path.write_text(text)
    return path


def test_targets_carry_the_hash_the_rendered_env_file_gives(tmp_path: Path) -> None:
    inv = load_inventory(_inv(tmp_path))
    plan = plan_from_inventory(inv)
    assert [(t.id, t.url, t.gpu) for t in plan.targets] == [
        ("a/0", "http://127.0.0.71:9000", 0), ("a/1", "http://127.0.0.71:9001", 1), ("b/0", "http://127.0.0.72:9000", None),
    ]  # fmt: skip
    first = inv.instances()[0]
    assert plan.targets[0].expected_config_hash == Settings.from_env(expected_env(inv, first)).config_hash()
    assert expected_config_hash(inv, first) == plan.targets[0].expected_config_hash
    assert plan.problems == []


def test_limit_keeps_only_the_chosen_hosts(tmp_path: Path) -> None:
    plan = plan_from_inventory(load_inventory(_inv(tmp_path)), {"b"})
    assert [t.id for t in plan.targets] == ["b/0"]
    assert len(plan.balancers) == 2  # the balancers are always part of the cluster's health


def test_every_balancer_host_is_probed_on_the_endpoint_scheme_and_port(tmp_path: Path) -> None:
    inv = load_inventory(_inv(tmp_path))
    assert balancer_endpoints(inv) == [("lb1", "http://127.0.0.2:8080"), ("lb2", "http://127.0.0.3:8080")]
