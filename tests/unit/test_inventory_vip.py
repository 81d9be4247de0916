"""``balancer.vip``: defaults, the endpoint, and exact errors at their YAML lines (never echoing the password)."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamactl.inventory.cluster import Inventory
from tests.inventory_support import inventory_yaml, load_problems, load_text

BASE = inventory_yaml({"node-1": "10.0.0.21"}, {"lb-01": "10.0.0.11", "lb-02": "10.0.0.12"})  # vip: on line 14


def load(tmp_path: Path, extra: str, env: dict[str, str] | None = None, base: str = BASE) -> Inventory:
    return load_text(tmp_path, base + extra, {"VRRP_PW": "s3cr3t"} if env is None else env)


def problems(tmp_path: Path, extra: str, env: dict[str, str] | None = None, base: str = BASE) -> list[str]:
    return load_problems(tmp_path, base + extra, {"VRRP_PW": "s3cr3t"} if env is None else env)


def test_no_vip_keeps_the_first_balancer_as_endpoint(tmp_path: Path) -> None:
    inv = load(tmp_path, "")
    assert inv.balancer.vip is None
    assert inv.endpoint == "http://10.0.0.11:80"


def test_vip_defaults_and_endpoint(tmp_path: Path) -> None:
    inv = load(tmp_path, "  vip: {address: 10.0.0.100, router_id: 51}\n")
    vip = inv.balancer.vip
    assert vip is not None
    assert (vip.address, vip.prefix, vip.interface, vip.router_id) == ("10.0.0.100", 24, None, 51)
    assert (vip.advert_interval_s, vip.nopreempt, vip.preempt_delay_s, vip.auth) == (0.25, True, 0, None)
    assert vip.config_path == "/etc/keepalived/keepalived.conf"
    assert inv.endpoint == "http://10.0.0.100:80"


def test_auth_from_env_and_file_never_in_repr(tmp_path: Path) -> None:
    inv = load(tmp_path, "  vip: {address: 10.0.0.100, router_id: 7, advert_interval_s: 1, auth: {env: VRRP_PW}}\n")
    assert inv.balancer.vip is not None and inv.balancer.vip.auth == "s3cr3t"
    assert "s3cr3t" not in repr(inv)
    (tmp_path / "vrrp.pass").write_text("filepw1\n")
    inv = load(tmp_path, "  vip: {address: 10.0.0.100, router_id: 7, advert_interval_s: 2, "
               "auth: {file: vrrp.pass}}\n")
    assert inv.balancer.vip is not None and inv.balancer.vip.auth == "filepw1"


ONE_LB = BASE.replace("    lb-02: {address: 10.0.0.12}\n", "")


@pytest.mark.parametrize(("extra", "env", "base", "expected"), [
    pytest.param("  vip: {address: 10.0.0.100, router_id: 51}\n", None, ONE_LB,
                 ["INV:13:3: balancer.vip: found a VIP with 1 balancer host (lb-01), expected at least two "
                  "balancer hosts to move it between"], id="one-balancer"),
    pytest.param("  vip: {address: 10.9.0.100, router_id: 51}\n", None, BASE,
                 ["INV:14:18: balancer.vip.address: found 10.9.0.100/24, expected an address in the subnet of every "
                  "balancer host (lb-01 at 10.0.0.11 is outside 10.9.0.0/24)",
                  "INV:14:18: balancer.vip.address: found 10.9.0.100/24, expected an address in the subnet of every "
                  "balancer host (lb-02 at 10.0.0.12 is outside 10.9.0.0/24)"], id="no-subnet"),
    pytest.param("  vip: {address: 10.0.0.21, router_id: 51}\n", None, BASE,
                 ["INV:14:18: balancer.vip.address: found 10.0.0.21, expected an address no host uses "
                  "(node-1 has it)"], id="taken"),
    pytest.param("  vip: {address: 10.0.0.255, router_id: 51}\n", None, BASE,
                 ["INV:14:18: balancer.vip.address: found 10.0.0.255, the broadcast address of 10.0.0.0/24, "
                  "expected a host address"], id="broadcast"),
    pytest.param("  vip: {address: 10.0.0.300, router_id: 51}\n", None, BASE,
                 ['INV:14:18: balancer.vip.address: found string "10.0.0.300", expected an IPv4 address like '
                  "10.0.0.100"], id="not-ipv4"),
    pytest.param("  vip: {address: 10.0.0.100, router_id: 256}\n", None, BASE,
                 ["INV:14:41: balancer.vip.router_id: found integer 256, expected an integer from 1 to 255"],
                 id="router-id-range"),
    pytest.param("  vip: {address: 10.0.0.100}\n", None, BASE,
                 ['INV:14:3: balancer.vip: found no "router_id", expected the VRRP virtual router id, 1 to 255'],
                 id="router-id-missing"),
    pytest.param("  vip: {address: 10.0.0.100, router_id: 5, auth: hunter2}\n", None, BASE,
                 ["INV:14:44: balancer.vip.auth: found an inline secret, expected {env: VAR} or {file: PATH} "
                  "(never a password inline)"], id="inline-auth"),
    pytest.param("  vip: {address: 10.0.0.100, router_id: 5, advert_interval_s: 1, auth: {env: NOPE}}\n", None,
                 BASE, ["INV:14:78: balancer.vip.auth.env: found NOPE, expected the environment variable NOPE to "
                        "be set (it holds the VRRP password)"], id="auth-env-unset"),
    pytest.param("  vip: {address: 10.0.0.100, router_id: 5, advert_interval_s: 1, auth: {env: VRRP_PW}}\n",
                 {"VRRP_PW": "much-too-long"}, BASE,
                 ["INV:14:78: balancer.vip.auth.env: found VRRP_PW holding 13 characters, expected a VRRP password "
                  "of 1 to 8 printable characters without spaces, quotes or backslashes"], id="auth-too-long"),
    pytest.param("  vip: {address: 10.0.0.100, router_id: 5, auth: {env: VRRP_PW}}\n", None, BASE,
                 ["INV:14:3: balancer.vip.advert_interval_s: found 0.25 with auth, expected whole seconds: VRRP "
                  "authentication needs VRRPv2, which advertises in whole seconds (without auth, VRRPv3 allows "
                  "sub-second adverts and a faster switch)"], id="auth-subsecond"),
    pytest.param("  vip: {address: 10.0.0.100, router_id: 5, preempt_delay_s: 30}\n", None, BASE,
                 ["INV:14:61: balancer.vip.preempt_delay_s: found 30 with nopreempt: true, expected nopreempt: "
                  "false for a preempt delay (a nopreempt host never takes the address back)"], id="delay-nopreempt"),
    pytest.param("  listen_address: 10.0.0.11\n  vip: {address: 10.0.0.100, router_id: 5}\n", None, BASE,
                 ["INV:14:19: balancer.listen_address: found 10.0.0.11 with balancer.vip, expected no "
                  "listen_address (nginx listens on every address so it answers on the VIP wherever it moves)"],
                 id="listen-address"),
    pytest.param("  vip: {address: 10.0.0.100, router_id: 5}\n", None,
                 BASE.replace("{address: 10.0.0.12}", "{address: lb2.example.com}"),
                 ['INV:13:22: balancer.hosts.lb-02.address: found "lb2.example.com", expected an IPv4 address when '
                  "balancer.vip is set (VRRP peers talk unicast to each other's IP addresses)"], id="dns-peer"),
])
def test_errors(tmp_path: Path, extra: str, env: dict[str, str] | None, base: str, expected: list[str]) -> None:
    found = problems(tmp_path, extra, env, base)
    assert found == expected
    assert not any("hunter2" in p or "much-too-long" in p for p in found)
