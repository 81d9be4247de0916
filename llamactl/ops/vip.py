"""keepalived on the balancer hosts (``balancer.vip``): preflight, apply, and who holds the address.

``preflight`` runs before a deploy changes anything: keepalived is installed where missing (or the deploy
stops with the exact command to run) and each host's interface is found. ``apply_vip`` runs after nginx
has its config: changed files only (tested with ``keepalived -t`` first, the previous ones put back when
refused), then start + enable where keepalived is not running, reload where its config changed, and finally
waits until exactly one host holds the address. A deploy with nothing changed only reads.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from llamactl.errors import LlamactlError
from llamactl.inventory.cluster import BalancerHost, Inventory, VipSpec
from llamactl.ops.hostplan import FileDiff
from llamactl.plan import keepalived as plan
from llamactl.plan.command import Command
from llamactl.plan.render import RenderedFile
from llamactl.remote.base import Executor

BACKUP_SUFFIX = ".llamactl-prev"


class VipError(LlamactlError):
    """keepalived could not be installed, configured or started, or no host took the address."""


@dataclass(frozen=True)
class VipHost:
    host: str
    interface: str
    changed_paths: list[str] = field(default_factory=list)
    action: str = "unchanged"  # unchanged | started | reloaded | enabled
    installed: bool = False  # deploy installed keepalived on it


@dataclass(frozen=True)
class VipResult:
    address: str
    hosts: list[VipHost]
    holder: str | None  # the balancer host holding the address

    @property
    def changed(self) -> bool:
        return any(h.changed_paths or h.action != "unchanged" or h.installed for h in self.hosts)

    def to_json(self) -> dict[str, object]:
        return {"address": self.address, "holder": self.holder, "changed": self.changed,
                "hosts": {h.host: {"interface": h.interface, "changed": h.changed_paths, "action": h.action,
                                   "installed": h.installed} for h in self.hosts}}


@dataclass(frozen=True)
class Prepared:
    interfaces: dict[str, str]
    installed: frozenset[str]


def preflight(inv: Inventory, executors: Mapping[str, Executor]) -> Prepared:
    """keepalived present on every balancer host (installed where missing) and each host's interface."""
    vip = _vip(inv)
    interfaces: dict[str, str] = {}
    installed: set[str] = set()
    for lb in inv.balancer.hosts:
        ex = executors[lb.name]
        if ex.run(plan.present_command(), check=False).exit_code != 0:
            attempt = ex.run(plan.install_command(), check=False)
            if ex.run(plan.present_command(), check=False).exit_code != 0:
                tail = " ".join((attempt.stderr or attempt.stdout).strip().splitlines()[-2:])
                raise VipError(f"{lb.name}: balancer.vip needs keepalived, which is not installed and could not be "
                               f"installed (`{plan.install_command().display()}` exited {attempt.exit_code}"
                               f"{': ' + tail if tail else ''}); install it on {lb.name} with "
                               f"`{plan.install_hint()}` and deploy again")
            installed.add(lb.name)
        interfaces[lb.name] = _interface(ex, lb, vip)
    return Prepared(interfaces, frozenset(installed))


def _vip(inv: Inventory) -> VipSpec:
    if inv.balancer.vip is None:
        raise VipError("balancer.vip is not set")
    return inv.balancer.vip


def _interface(ex: Executor, lb: BalancerHost, vip: VipSpec) -> str:
    addresses = plan.parse_addresses(ex.run(plan.addresses_command()).stdout)
    if vip.interface is not None:
        if vip.interface not in addresses:
            known = ", ".join(sorted(addresses)) or "none"
            raise VipError(f"{lb.name}: balancer.vip.interface {vip.interface} has no IPv4 address on this host "
                           f"(interfaces with one: {known})")
        return vip.interface
    name = plan.interface_of(addresses, lb.address)
    if name is None:
        raise VipError(f"{lb.name}: no interface holds its inventory address {lb.address}; set "
                       "balancer.vip.interface")
    return name


def apply_vip(
    inv: Inventory,
    executors: Mapping[str, Executor],
    prepared: Prepared,
    *,
    say: Callable[[str, str], None] = lambda host, msg: None,
    wait_s: float = 15.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> VipResult:
    vip = _vip(inv)
    hosts: list[VipHost] = []
    for lb in inv.balancer.hosts:
        ex = executors[lb.name]
        interface = prepared.interfaces[lb.name]
        files = plan.render_keepalived_files(inv, lb, interface)
        changed = _upload(ex, lb.name, files, vip.config_path)
        action = _run_state(ex, changed, say, lb.name)
        hosts.append(VipHost(lb.name, interface, changed, action, lb.name in prepared.installed))
    holder = wait_holder(inv, executors, wait_s=wait_s, sleep=sleep, clock=clock)
    return VipResult(vip.address, hosts, holder)


def _upload(ex: Executor, host: str, files: Mapping[str, RenderedFile], conf_path: str) -> list[str]:
    """Upload changed files; when ``keepalived -t`` refuses the result, every changed file is put back."""
    previous: dict[str, bytes | None] = {}
    for path, rendered in files.items():
        current = ex.read_bytes(path)
        if current == rendered.content:
            continue
        previous[path] = current
        ex.put_bytes(rendered.content, path, rendered.mode)
    if previous:
        test = ex.run(plan.config_test_command(conf_path), check=False)
        if test.exit_code != 0:
            for path, old in previous.items():
                if old is None:
                    ex.run(Command.of("rm", "-f", path), check=False)
                else:
                    ex.put_bytes(old, path, files[path].mode)
            detail = "\n  ".join((test.stderr + test.stdout).strip().splitlines()[-8:])
            raise VipError(f"{host}: {conf_path}: keepalived rejected the new config "
                           f"(`{plan.config_test_command(conf_path).display()}` exited {test.exit_code}); the "
                           f"previous files were put back and keepalived was not reloaded\n  {detail}")
    return list(previous)


def _run_state(ex: Executor, changed: list[str], say: Callable[[str, str], None], host: str) -> str:
    active = ex.run(plan.is_active_command(), check=False).stdout.strip() == "active"
    if not active:
        say(host, "starting keepalived")
        ex.run(plan.start_command())
        if ex.run(plan.is_active_command(), check=False).stdout.strip() != "active":
            raise VipError(f"{host}: keepalived did not start; see `journalctl -u keepalived` on {host}")
        return "started"
    if changed:
        say(host, "reloading keepalived")
        ex.run(plan.reload_command())
        action = "reloaded"
    else:
        action = "unchanged"
    if ex.run(plan.is_enabled_command(), check=False).stdout.strip() != "enabled":
        ex.run(plan.start_command())
        action = "enabled" if action == "unchanged" else action
    return action


def holders(inv: Inventory, executors: Mapping[str, Executor]) -> dict[str, bool]:
    """Which balancer hosts hold the address now (read over SSH)."""
    vip = _vip(inv)
    out: dict[str, bool] = {}
    for lb in inv.balancer.hosts:
        res = executors[lb.name].run(plan.addresses_command(), check=False)
        out[lb.name] = res.exit_code == 0 and plan.holds_vip(plan.parse_addresses(res.stdout), vip)
    return out


def wait_holder(inv: Inventory, executors: Mapping[str, Executor], *, wait_s: float,
                sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> str:
    """The one host holding the address, waiting up to ``wait_s`` for an election to settle."""
    deadline = clock() + wait_s
    while True:
        held = [name for name, yes in holders(inv, executors).items() if yes]
        if len(held) == 1:
            return held[0]
        if clock() >= deadline:
            vip = _vip(inv)
            if held:
                raise VipError(f"balancer.vip {vip.address} is held by {', '.join(held)} at once after "
                               f"{wait_s:g} s: the hosts do not hear each other's VRRP adverts (a firewall "
                               "dropping IP protocol 112, or another router with the same router_id?)")
            raise VipError(f"balancer.vip {vip.address} is held by no balancer host after {wait_s:g} s: is nginx "
                           "answering /healthz on each (keepalived's check)? see `journalctl -u keepalived`")
        sleep(0.25)


@dataclass(frozen=True)
class VipHostState:
    host: str
    keepalived: str  # systemd's word for keepalived.service, or why it could not be read
    holds: bool | None  # None: could not be read


@dataclass(frozen=True)
class VipState:
    address: str
    hosts: list[VipHostState]

    @property
    def holders(self) -> list[str]:
        return [h.host for h in self.hosts if h.holds]

    @property
    def ok(self) -> bool:
        return len(self.holders) == 1 and all(h.keepalived == "active" for h in self.hosts)

    def to_json(self) -> dict[str, object]:
        return {"address": self.address, "holder": self.holders[0] if len(self.holders) == 1 else None,
                "holders": self.holders, "ok": self.ok,
                "hosts": {h.host: {"keepalived": h.keepalived, "holds_vip": h.holds} for h in self.hosts}}


def vip_state(inv: Inventory, timeout_s: float) -> VipState:
    """For ``status``: on each balancer host (over SSH, in parallel) whether keepalived runs and holds the VIP."""
    from llamactl.ops.connect import HostPool
    from llamactl.remote.parallel import run_parallel

    vip = _vip(inv)

    def one(pool: HostPool, lb: BalancerHost) -> VipHostState:
        try:
            ex = pool.executor(lb.name)
            active = ex.run(plan.is_active_command(), check=False, timeout_s=timeout_s).stdout.strip()
            addrs = ex.run(plan.addresses_command(), check=False, timeout_s=timeout_s)
        except LlamactlError as exc:
            return VipHostState(lb.name, f"unknown ({exc})", None)
        holds = plan.holds_vip(plan.parse_addresses(addrs.stdout), vip) if addrs.exit_code == 0 else None
        return VipHostState(lb.name, active or "unknown", holds)

    with HostPool(inv) as pool:
        outcomes = run_parallel(inv.balancer.hosts, lambda lb: one(pool, lb), max_workers=8)
    states = [o.value if o.ok else VipHostState(lb.name, f"unknown ({o.error})", None)  # type: ignore[union-attr]
              for lb, o in zip(inv.balancer.hosts, outcomes)]
    return VipState(vip.address, states)


_AUTH_LINE = re.compile(rb"(auth_pass )\S+")


def dry_run_diffs(inv: Inventory, executors: Mapping[str, Executor]) -> list[FileDiff]:
    """``deploy --dry-run``: the keepalived files that would change, per balancer host (``HOST:PATH``), the
    VRRP password masked. Reads only."""
    vip = _vip(inv)
    diffs: list[FileDiff] = []
    for lb in inv.balancer.hosts:
        ex = executors[lb.name]
        files = plan.render_keepalived_files(inv, lb, _interface(ex, lb, vip))
        for path, rendered in files.items():
            old = ex.read_bytes(path)
            if old != rendered.content:
                masked_old = None if old is None else _AUTH_LINE.sub(rb"\1***", old)
                diffs.append(FileDiff(f"{lb.name}:{path}", masked_old, _AUTH_LINE.sub(rb"\1***", rendered.content),
                                      True))
    return diffs
