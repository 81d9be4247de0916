"""keepalived.conf for ``balancer.vip``: priorities by host order, unicast peers, nopreempt or a preempt delay,
VRRPv3 without auth and v2 with it; accepted by the real ``keepalived -t`` (inside a private network namespace
of this test's own, with a veth pair for the interface: keepalived refuses loopback and unknown interfaces)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from llamactl.inventory.cluster import Inventory
from llamactl.plan.keepalived import (
    CHECK_SCRIPT,
    holds_vip,
    interface_of,
    parse_addresses,
    render_keepalived_files,
)
from tests.inventory_support import inventory_yaml, load_text
from tests.render.tools import need

INV = inventory_yaml({"node-1": "10.0.0.21"}, {"lb-01": "10.0.0.11", "lb-02": "10.0.0.12", "lb-03": "10.0.0.13"},
                     cluster="vision-prod", balancer="  listen: 8080\n  server_name: vision.example.com\n")


def load(tmp_path: Path, vip: str, env: dict[str, str] | None = None) -> Inventory:
    return load_text(tmp_path, INV + vip, env or {})


def conf(inv: Inventory, index: int, interface: str = "eth0") -> str:
    files = render_keepalived_files(inv, inv.balancer.hosts[index], interface)
    assert inv.balancer.vip is not None
    return files[inv.balancer.vip.config_path].content.decode()


def test_priorities_peers_and_nopreempt(tmp_path: Path) -> None:
    inv = load(tmp_path, "  vip: {address: 10.0.0.100, prefix: 24, router_id: 51}\n")
    first, second, third = conf(inv, 0), conf(inv, 1, "ens5"), conf(inv, 2)
    assert "priority 200\n" in first and "priority 190\n" in second and "priority 180\n" in third
    assert "unicast_src_ip 10.0.0.12\n    unicast_peer {\n        10.0.0.11\n        10.0.0.13\n    }" in second
    assert "interface ens5\n" in second and "10.0.0.100/24 dev ens5\n" in second
    for text in (first, second, third):
        assert "state BACKUP\n" in text and "nopreempt\n" in text and "preempt_delay" not in text
        assert "version 3\n    advert_int 0.25\n" in text and "authentication" not in text
        assert "virtual_router_id 51\n" in text and "check_unicast_src\n" in text
        assert f'script "{CHECK_SCRIPT}"' in text and "track_script {\n        llamactl_nginx\n" in text
        assert "vrrp_instance llamactl_vision_prod {" in text
    check = render_keepalived_files(inv, inv.balancer.hosts[0], "eth0")[CHECK_SCRIPT]
    assert check.mode == 0o755
    assert b"/dev/tcp/127.0.0.1/8080" in check.content and b"Host: vision.example.com\\r\\n" in check.content


def test_preempt_delay_and_auth_use_vrrp2(tmp_path: Path) -> None:
    inv = load(tmp_path, "  vip: {address: 10.0.0.100, router_id: 9, nopreempt: false, preempt_delay_s: 60, "
               "advert_interval_s: 1, auth: {env: PW}}\n", env={"PW": "pa55w0rd"})
    text = conf(inv, 1)
    assert "preempt_delay 60\n" in text and "nopreempt" not in text
    assert "version 2\n    advert_int 1\n" in text
    assert "authentication {\n        auth_type PASS\n        auth_pass pa55w0rd\n    }" in text
    files = render_keepalived_files(inv, inv.balancer.hosts[0], "eth0")
    assert files["/etc/keepalived/keepalived.conf"].mode == 0o600  # it holds the password


def test_no_vip_renders_nothing(tmp_path: Path) -> None:
    inv = load(tmp_path, "")
    assert render_keepalived_files(inv, inv.balancer.hosts[0], "eth0") == {}


IP_ADDR = """\
1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever
2: eth0@if14    inet 10.203.0.10/24 brd 10.203.0.255 scope global eth0\\       valid_lft forever preferred_lft forever
2: eth0@if14    inet 10.203.0.250/24 scope global secondary eth0\\       valid_lft forever preferred_lft forever
"""


def test_parse_addresses_interface_and_holder(tmp_path: Path) -> None:
    inv = load(tmp_path, "  vip: {address: 10.203.0.250, router_id: 51}\n".replace("10.203.0.250", "10.0.0.100"))
    addrs = parse_addresses(IP_ADDR)
    assert interface_of(addrs, "10.203.0.10") == "eth0" and interface_of(addrs, "10.203.0.11") is None
    assert inv.balancer.vip is not None and not holds_vip(addrs, inv.balancer.vip)
    assert holds_vip(parse_addresses(IP_ADDR.replace("10.203.0.250", "10.0.0.100")), inv.balancer.vip)


@pytest.mark.parametrize("vip", [
    "  vip: {address: 10.0.0.100, router_id: 51}\n",
    "  vip: {address: 10.0.0.100, router_id: 9, nopreempt: false, preempt_delay_s: 60, advert_interval_s: 1, "
    "auth: {env: PW}}\n",
], ids=["vrrp3-nopreempt", "vrrp2-auth-delay"])
def test_keepalived_accepts_the_config(tmp_path: Path, vip: str) -> None:
    keepalived = need("keepalived")
    if os.geteuid() != 0:
        pytest.skip("keepalived -t needs a network namespace (root) holding the configured interface")
    inv = load(tmp_path, vip, env={"PW": "pa55w0rd"})
    etc = tmp_path / "etc-keepalived"
    etc.mkdir()
    for index in range(3):
        for path, rendered in render_keepalived_files(inv, inv.balancer.hosts[index], "vip0").items():
            (etc / Path(path).name).write_bytes(rendered.content)
            (etc / Path(path).name).chmod(rendered.mode)
        # A private netns and mount ns of this test: the check script at its real path, a veth as vip0.
        script = (f"mount --bind {etc} /etc/keepalived && ip link add vip0 type veth peer name vip1 && "
                  f"ip link set vip0 up && {keepalived} -t -f /etc/keepalived/keepalived.conf")
        result = subprocess.run(["unshare", "--net", "--mount", "sh", "-c", script],
                                capture_output=True, text=True, timeout=30, check=False)
        assert result.returncode == 0 and result.stderr == "", result.stderr
    # And the check: a broken config is refused (the test can fail).
    (etc / "keepalived.conf").write_text((etc / "keepalived.conf").read_text().replace("priority", "priorty"))
    bad = subprocess.run(["unshare", "--net", "--mount", "sh", "-c",
                          f"mount --bind {etc} /etc/keepalived && ip link add vip0 type veth peer name vip1 && "
                          f"{keepalived} -t -f /etc/keepalived/keepalived.conf"], capture_output=True, text=True, check=False)
    assert bad.returncode != 0


def test_render_cli_writes_keepalived_files_when_the_interface_is_known(tmp_path: Path) -> None:
    import sys

    path = tmp_path / "inv.yaml"
    path.write_text(INV + "  vip: {address: 10.0.0.100, router_id: 51, interface: ens5}\n")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "llamactl", "render", str(path), "--out", str(out)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    for host, prio in (("lb-01", 200), ("lb-02", 190), ("lb-03", 180)):
        conf = out / host / "etc/keepalived/keepalived.conf"
        assert f"priority {prio}\n" in conf.read_text() and (conf.stat().st_mode & 0o777) == 0o600
        assert (out / host / CHECK_SCRIPT.lstrip("/")).exists()
    path.write_text(INV + "  vip: {address: 10.0.0.100, router_id: 51}\n")  # interface found at deploy time
    proc = subprocess.run([sys.executable, "-m", "llamactl", "render", str(path), "--out", str(out)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and not (out / "lb-01/etc/keepalived/keepalived.conf").exists()
