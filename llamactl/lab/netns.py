"""Network plumbing of the lab: one bridge in the root namespace, one netns + veth per host.

Everything here shells out to iproute2 (`ip`), the same tool an operator would use to inspect it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

from llamactl.errors import LlamactlError


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], check=False, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise LlamactlError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc


def link_exists(name: str) -> bool:
    return ip("link", "show", "dev", name, check=False).returncode == 0


def list_netns() -> list[str]:
    out = ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def list_links(prefix: str) -> list[str]:
    """Root-namespace links whose name starts with ``prefix`` (peer suffixes like ``@if3`` dropped)."""
    out = ip("-o", "link", "show", check=False).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]
    return [n for n in names if n.startswith(prefix)]


def networks_in_use() -> list[tuple[str, str]]:
    """(device, network) of every IPv4 address in the root namespace."""
    out = ip("-o", "-4", "addr", "show", check=False).stdout
    return [(line.split()[1], line.split()[3]) for line in out.splitlines() if " inet " in line]


def create_bridge(bridge: str, address: str) -> None:
    ip("link", "add", bridge, "type", "bridge")
    ip("addr", "add", address, "dev", bridge)
    ip("link", "set", bridge, "up")


def create_host_net(netns: str, veth: str, bridge: str, address: str, prefixlen: int) -> None:
    """A netns with loopback and ``eth0`` (the peer of ``veth``, which joins the bridge)."""
    ip("netns", "add", netns)
    ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
    ip("link", "set", veth, "master", bridge, "up")
    ip("-n", netns, "link", "set", "lo", "up")
    ip("-n", netns, "addr", "add", f"{address}/{prefixlen}", "dev", "eth0")
    ip("-n", netns, "link", "set", "eth0", "up")
    # No default route on purpose: lab hosts reach each other and the controller, nothing else.


def netns_pids(netns: str) -> list[int]:
    out = ip("netns", "pids", netns, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def kill_netns_processes(netns: str, extra_pids: list[int], timeout_s: float = 15.0) -> None:
    """SIGKILL the host's ``unshare`` (its --kill-child takes the PID namespace down) and anything
    else left in the netns, then wait until the netns holds no process."""
    deadline = time.monotonic() + timeout_s
    started = list(extra_pids)
    while True:
        for pid in set(extra_pids) | set(netns_pids(netns)):
            _signal(pid)
        if not netns_pids(netns):
            for pid in started:
                _reap(pid)
            return
        if time.monotonic() > deadline:
            raise LlamactlError(f"netns {netns}: processes {netns_pids(netns)} survive SIGKILL")
        extra_pids = []
        time.sleep(0.05)


def signal_and_wait(pid: int, until_gone: int, timeout_s: float) -> None:
    """SIGKILL ``pid``, then wait (bounded) until process ``until_gone`` has exited."""
    _signal(pid)
    deadline = time.monotonic() + timeout_s
    while os.path.exists(f"/proc/{until_gone}") and time.monotonic() < deadline:
        try:
            with open(f"/proc/{until_gone}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.01)


def reap(pid: int) -> None:
    _reap(pid)


def _signal(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _reap(pid: int) -> None:
    # When this process started the host (tests run up and down in one process) it must reap the
    # killed `unshare` or a zombie stays behind; any other process's child is reaped by its parent.
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def delete_netns(netns: str) -> None:
    if netns in list_netns():
        ip("netns", "delete", netns)


def delete_link(name: str) -> None:
    # A veth whose peer's netns was just deleted disappears on its own, maybe between our calls.
    proc = ip("link", "delete", name, check=False)
    if proc.returncode != 0 and link_exists(name):
        raise LlamactlError(f"`ip link delete {name}` failed: {proc.stderr.strip()}")
