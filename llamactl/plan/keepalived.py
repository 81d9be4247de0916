"""keepalived on the balancer hosts (``balancer.vip``): its rendered files, the commands that install,
start, reload and inspect it, and the parsers of their output. Pure: no sockets, no subprocess, no clock.

Every balancer host runs one VRRP instance in state BACKUP; priorities fall by inventory order (the first
host wins the first election), peers talk unicast, and ``nopreempt`` (the default) or a preempt delay
keeps a host that comes back from taking the address again. A ``vrrp_script`` gives the address up when
nginx stops answering on loopback. Without auth it speaks VRRPv3 (sub-second adverts: a faster switch);
with auth, VRRPv2 (the only version with a password; whole-second adverts).
"""

from __future__ import annotations

import ipaddress
import re

from llamactl.inventory.cluster import BalancerHost, Inventory, VipSpec
from llamactl.plan.command import Command, quote
from llamactl.plan.render import RenderedFile, _render

CHECK_SCRIPT = "/etc/keepalived/llamactl-check-nginx.sh"
UNIT = "keepalived.service"
INSTALL = ("apt-get", "install", "-y", "--no-install-recommends", "keepalived")
TOP_PRIORITY = 200
PRIORITY_STEP = 10


def priority(index: int) -> int:
    """VRRP priority of the ``index``-th balancer host (0-based): 200, 190, ... never below 1."""
    return max(1, TOP_PRIORITY - PRIORITY_STEP * index)


def instance_name(cluster: str) -> str:
    return "llamactl_" + re.sub(r"[^A-Za-z0-9_]", "_", cluster)


def _host_header(server_name: str) -> str:
    first = server_name.split()[0]
    return "localhost" if first == "_" or "*" in first else first


def render_keepalived_files(inv: Inventory, host: BalancerHost, interface: str) -> dict[str, RenderedFile]:
    """keepalived.conf (0600: it may hold the VRRP password) and the nginx check script of ``host``."""
    vip = inv.balancer.vip
    if vip is None:
        return {}
    names = [lb.name for lb in inv.balancer.hosts]
    index = names.index(host.name)
    version = 2 if vip.auth else 3
    conf = _render(
        "keepalived.conf.j2",
        cluster=inv.cluster,
        host=host.name,
        hosts=names,
        vip=vip,
        instance=instance_name(inv.cluster),
        interface=interface,
        priority=priority(index),
        version=version,
        advert_int=f"{vip.advert_interval_s:g}" if version == 3 else str(int(vip.advert_interval_s)),
        address=host.address,
        peers=[lb.address for lb in inv.balancer.hosts if lb.name != host.name],
        check_script=CHECK_SCRIPT,
    )
    check = _render("llamactl-vrrp-check.sh.j2", port=inv.balancer.listen,
                    host_header=_host_header(inv.balancer.server_name))
    return {vip.config_path: RenderedFile(conf, 0o600), CHECK_SCRIPT: RenderedFile(check, 0o755)}


# --- commands -----------------------------------------------------------------------------------------

def present_command() -> Command:
    """Prints keepalived's path when it is installed (exit 1 when not)."""
    return Command.sh("command -v keepalived || test -x /usr/sbin/keepalived && echo /usr/sbin/keepalived",
                      "is keepalived installed")


def install_command() -> Command:
    return Command.sh("DEBIAN_FRONTEND=noninteractive " + " ".join(quote(a) for a in INSTALL), "install keepalived")


def install_hint() -> str:
    """What the user runs on a balancer host when deploy cannot install keepalived itself."""
    return " ".join(INSTALL)


def addresses_command() -> Command:
    """Every IPv4 address of the host, one ``ip -o`` line each (see ``parse_addresses``)."""
    return Command.of("ip", "-o", "-4", "addr", "show")


def config_test_command(path: str) -> Command:
    return Command.of("keepalived", "-t", "-f", path)


def is_active_command() -> Command:
    return Command.of("systemctl", "is-active", UNIT)


def start_command() -> Command:
    return Command.of("systemctl", "enable", "--now", UNIT)


def reload_command() -> Command:
    """A running keepalived re-reads its config on reload and keeps its VRRP state (no needless switch)."""
    return Command.of("systemctl", "reload", UNIT)


def restart_command() -> Command:
    return Command.of("systemctl", "restart", UNIT)


def is_enabled_command() -> Command:
    return Command.of("systemctl", "is-enabled", UNIT)


# --- parsers ------------------------------------------------------------------------------------------

def parse_addresses(text: str) -> dict[str, list[ipaddress.IPv4Interface]]:
    """``ip -o -4 addr show`` -> {interface: [address/prefix, ...]} (``eth0@if12`` names lose the ``@``)."""
    out: dict[str, list[ipaddress.IPv4Interface]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4 or parts[2] != "inet":
            continue
        name = parts[1].split("@")[0]
        try:
            out.setdefault(name, []).append(ipaddress.IPv4Interface(parts[3]))
        except ValueError:
            continue
    return out


def interface_of(addresses: dict[str, list[ipaddress.IPv4Interface]], address: str) -> str | None:
    """The interface holding ``address`` (the host's inventory address)."""
    wanted = ipaddress.IPv4Address(address)
    for name, items in addresses.items():
        if any(item.ip == wanted for item in items):
            return name
    return None


def holds_vip(addresses: dict[str, list[ipaddress.IPv4Interface]], vip: VipSpec) -> bool:
    wanted = ipaddress.IPv4Address(vip.address)
    return any(item.ip == wanted for items in addresses.values() for item in items)
