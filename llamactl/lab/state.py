"""The lab's names, addresses and its state file (what ``lab down`` and crash repair read)."""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llamactl.errors import UsageError

STATE_FILE = "lab-state.json"
DEFAULT_NAME = "lab"
DEFAULT_SUBNET = "10.203.0.0/24"
# Interface names are limited to 15 bytes: "v" + name + "-" + index must fit.
_NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")


@dataclass
class LabHost:
    """One lab host: its netns, the root-side veth end, address and per-host state directory."""

    name: str
    role: str  # "server" | "balancer"
    address: str
    netns: str
    veth: str
    state_dir: str
    pid: int | None = None  # the host's `unshare`; its child is the host's systemd (PID 1 inside)
    launcher: int | None = None  # the shell that started `unshare` and reaps it
    cgroups: list[str] = field(default_factory=list)


@dataclass
class LabState:
    name: str
    subnet: str
    dir: str
    bridge: str
    bridge_address: str
    hosts: list[LabHost]
    vip: str | None = None  # with two or more balancer hosts: the floating address keepalived moves

    @property
    def balancer(self) -> LabHost:
        return next(h for h in self.hosts if h.role == "balancer")

    @property
    def balancers(self) -> list[LabHost]:
        return [h for h in self.hosts if h.role == "balancer"]

    @property
    def servers(self) -> list[LabHost]:
        return [h for h in self.hosts if h.role == "server"]

    def save(self) -> None:
        path = Path(self.dir) / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(path)


def load_state(directory: Path) -> LabState | None:
    """Read ``DIR/lab-state.json``; None when there is none. A corrupt file is a usage error naming it."""
    path = directory / STATE_FILE
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text())
        hosts = [LabHost(**h) for h in raw.pop("hosts")]
        return LabState(hosts=hosts, **raw)
    except (ValueError, TypeError, KeyError) as exc:
        raise UsageError(f"{path}: unreadable lab state ({exc}); remove it and run `llamactl lab down`") from exc


def check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise UsageError(
            f"--name {name!r}: expected 1-8 characters, a lowercase letter then letters or digits "
            "(it prefixes namespace and interface names, which are limited to 15 characters)"
        )
    return name


MAX_BALANCERS = 3
VIP_FROM_TOP = 6  # the VIP is the 6th address from the subnet's top (.250 in a /24), lb2.. follow it


def plan_state(name: str, subnet: str, directory: Path, count: int, balancers: int = 1) -> LabState:
    """Names and addresses of a lab of ``count`` servers and ``balancers`` balancer hosts (pure).

    The first balancer is lab-lb at .10; with two or more, lab-lb2.. sit just above a VIP near the
    subnet's top (a /24: VIP .250, lab-lb2 .251, lab-lb3 .252), clear of the servers at .11 up."""
    check_name(name)
    if not 1 <= count <= 200:
        raise UsageError(f"N={count}: expected between 1 and 200 hosts")
    if not 1 <= balancers <= MAX_BALANCERS:
        raise UsageError(f"--balancers {balancers}: expected 1 to {MAX_BALANCERS} balancer hosts")
    try:
        net = ipaddress.IPv4Network(subnet, strict=True)
    except ValueError as exc:
        raise UsageError(f"--subnet {subnet!r}: {exc}") from exc
    if net.num_addresses < 10 + count + 2:
        raise UsageError(f"--subnet {subnet}: too small for {count} hosts (needs addresses up to .{10 + count})")
    prefix = net.prefixlen

    def host(hname: str, role: str, index: str, offset: int) -> LabHost:
        return LabHost(
            name=hname,
            role=role,
            address=str(net[offset]),
            netns=f"{name}-{index}",
            veth=f"v{name}-{index.removeprefix('host')}",
            state_dir=str(directory / "hosts" / hname),
        )

    hosts = [host("lab-lb", "balancer", "lb", 10)]
    vip = None
    if balancers > 1:
        top = net.num_addresses - VIP_FROM_TOP
        if top <= 10 + count:
            raise UsageError(f"--subnet {subnet}: too small for {count} hosts and a VIP with {balancers} balancers")
        vip = str(net[top])
        hosts += [host(f"lab-lb{k}", "balancer", f"lb{k}", top + k - 1) for k in range(2, balancers + 1)]
    hosts += [host(f"lab-host{i}", "server", f"host{i}", 10 + i) for i in range(1, count + 1)]
    return LabState(
        name=name,
        subnet=str(net),
        dir=str(directory),
        bridge=f"br-{name}",
        bridge_address=f"{net[1]}/{prefix}",
        hosts=hosts,
        vip=vip,
    )
