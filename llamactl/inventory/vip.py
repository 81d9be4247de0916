"""The optional ``balancer.vip``: one floating address for two or more balancer hosts (keepalived VRRP).

Checked against the balancer hosts (IPv4 peers, one subnet, an address no host uses) with the VRRP
password read from the controller's environment or a file, never from the inventory text.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamactl.inventory.cluster import BalancerSpec, HostSpec, VipSpec
from llamactl.inventory.model import Document
from llamactl.inventory.secrets import REF, SecretRule, read_secret

if TYPE_CHECKING:
    from llamactl.inventory.load import _Context

VIP = ("balancer", "vip")
# keepalived's PASS authentication uses at most 8 characters; written unquoted into keepalived.conf.
_AUTH_RE = re.compile(r"[!#-&(-\[\]-~]{1,8}\Z")
_AUTH_EXPECTED = "a VRRP password of 1 to 8 printable characters without spaces, quotes or backslashes"
_REF = REF
_AUTH_RULE = SecretRule(VIP + ("auth",), "VRRP password", "VRRP password", _AUTH_RE, _AUTH_EXPECTED)


def inline_auth(ctx: _Context, data: dict[str, Any]) -> None:
    """Report a password written inline before the section is typed, so no message echoes it."""
    balancer = data.get("balancer")
    vip = balancer.get("vip") if isinstance(balancer, dict) else None
    if not isinstance(vip, dict) or "auth" not in vip or isinstance(vip["auth"], dict) or vip["auth"] is None:
        return
    ctx.add(VIP + ("auth",), f"found an inline secret, expected {_REF} (never a password inline)")
    vip["auth"] = None


def resolve(ctx: _Context, doc: Document | None, hosts: list[HostSpec], balancer: BalancerSpec | None,
            base: Path, env: Mapping[str, str]) -> BalancerSpec | None:
    """``balancer`` with its checked ``vip`` (unchanged without the section)."""
    if doc is None or balancer is None or doc.balancer.vip is None:
        return balancer
    cfg = doc.balancer.vip
    ok = True
    if len(balancer.hosts) < 2:
        names = ", ".join(lb.name for lb in balancer.hosts) or "none"
        ctx.add(VIP, f"found a VIP with {len(balancer.hosts)} balancer host ({names}), expected at least two "
                "balancer hosts to move it between")
        ok = False
    if balancer.listen_address is not None:
        ctx.add(("balancer", "listen_address"), f"found {balancer.listen_address} with balancer.vip, expected "
                "no listen_address (nginx listens on every address so it answers on the VIP wherever it moves)",
                key=False)
        ok = False
    network = ipaddress.IPv4Network(f"{cfg.address}/{cfg.prefix}", strict=False)
    vip = ipaddress.IPv4Address(cfg.address)
    if cfg.prefix < 31 and vip in (network.network_address, network.broadcast_address):
        what = "network" if vip == network.network_address else "broadcast"
        ctx.add(VIP + ("address",), f"found {cfg.address}, the {what} address of {network}, expected a host "
                "address", key=False)
        ok = False
    for lb in balancer.hosts:
        where = ("balancer", "hosts", lb.name, "address")
        try:
            peer = ipaddress.IPv4Address(lb.address)
        except ValueError:
            ctx.add(where, f'found "{lb.address}", expected an IPv4 address when balancer.vip is set '
                    "(VRRP peers talk unicast to each other's IP addresses)", key=False)
            ok = False
            continue
        if peer not in network:
            ctx.add(VIP + ("address",), f"found {cfg.address}/{cfg.prefix}, expected an address in the subnet of "
                    f"every balancer host ({lb.name} at {lb.address} is outside {network})", key=False)
            ok = False
    users = [(lb.name, lb.address) for lb in balancer.hosts] + [(h.name, h.address) for h in hosts]
    for name, address in users:
        if address == cfg.address:
            ctx.add(VIP + ("address",), f"found {cfg.address}, expected an address no host uses ({name} has it)",
                    key=False)
            ok = False
    if cfg.nopreempt and cfg.preempt_delay_s:
        ctx.add(VIP + ("preempt_delay_s",), f"found {cfg.preempt_delay_s} with nopreempt: true, expected "
                "nopreempt: false for a preempt delay (a nopreempt host never takes the address back)", key=False)
        ok = False
    if abs(cfg.advert_interval_s * 100 - round(cfg.advert_interval_s * 100)) > 1e-6:
        ctx.add(VIP + ("advert_interval_s",), f"found {cfg.advert_interval_s:g}, expected a multiple of 0.01 s",
                key=False)
        ok = False
    password = None
    if cfg.auth is not None:
        password = _password(ctx, cfg.auth.env, cfg.auth.file, base, env)
        ok = ok and password is not None
        if cfg.advert_interval_s != int(cfg.advert_interval_s):
            ctx.add(VIP + ("advert_interval_s",), f"found {cfg.advert_interval_s:g} with auth, expected whole "
                    "seconds: VRRP authentication needs VRRPv2, which advertises in whole seconds (without auth, "
                    "VRRPv3 allows sub-second adverts and a faster switch)", key=False)
            ok = False
    if not ok:
        return balancer
    spec = VipSpec(address=cfg.address, prefix=cfg.prefix, interface=cfg.interface, router_id=cfg.router_id,
                   advert_interval_s=cfg.advert_interval_s, nopreempt=cfg.nopreempt,
                   preempt_delay_s=cfg.preempt_delay_s, auth=password, config_path=cfg.config_path)
    return dataclasses.replace(balancer, vip=spec)


def _password(ctx: _Context, var: str | None, file: str | None, base: Path, env: Mapping[str, str]) -> str | None:
    return read_secret(ctx, _AUTH_RULE, var, file, base, env)
