"""`lab up`, `lab down`, `lab status`: bring a lab of real hosts up, tear it down, report on it."""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from llamactl.errors import LlamactlError, UsageError
from llamactl.lab import cgroups, host, inventory, netns, wheelhouse
from llamactl.lab import model as lab_model
from llamactl.lab.state import STATE_FILE, LabHost, LabState, load_state, plan_state

Say = Callable[[str], None]
TOOLS = ("ip", "unshare", "nsenter", "ssh-keygen", "mount")
FILES = ("/lib/systemd/systemd", "/usr/sbin/sshd", "/usr/sbin/nginx", "/usr/bin/python3", "/usr/bin/redis-server",
         "/usr/bin/prometheus", "/usr/bin/prometheus-nginx-exporter")  # the balancer's Redis and Prometheus
KEEPALIVED = "/usr/sbin/keepalived"  # --balancers 2: the hosts' VRRP daemon
# What `lab up` writes into DIR (and `lab down` removes).
MADE = ("hosts", "init.sh", STATE_FILE, "inventory.yaml", "known_hosts", "endpoint", "id_ed25519",
        "id_ed25519.pub", "model", "wheelhouse", "redis-password")


def require_root(action: str) -> None:
    if os.geteuid() != 0:
        raise UsageError(
            f"`llamactl lab {action}` needs root: it creates network namespaces, veth links, a bridge, "
            "cgroups and mounts, and runs systemd as PID 1 of each host (try: sudo llamactl lab ...)"
        )


def check_prerequisites(vip: bool = False) -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None] + [f for f in FILES if not os.path.exists(f)]
    if vip and not os.path.exists(KEEPALIVED):  # hosts see this machine's /usr: installed here, there too
        missing.append(KEEPALIVED)
    if not list(Path("/usr/lib").glob("python3*/ensurepip/__init__.py")):
        missing.append("python3-venv (ensurepip)")  # hosts build their venvs with `python3 -m venv`
    if missing:
        raise UsageError(
            "lab hosts need these on this machine, missing: " + ", ".join(missing)
            + " (Debian: apt-get install iproute2 util-linux openssh-server nginx systemd python3-venv redis-server"
            + " prometheus prometheus-nginx-exporter" + (" keepalived" if vip else "") + ")"
        )


def _cgroup_name(state: LabState, h: LabHost) -> str:
    return f"llamactl-lab-{state.name}-{h.netns.removeprefix(state.name + '-')}"


def up(count: int, directory: Path, name: str, subnet: str, say: Say,
       model: bool = True, wheels: bool = True, timeout_s: float = 60.0, balancers: int = 1) -> LabState:
    require_root("up")
    check_prerequisites(vip=balancers > 1)
    directory = directory.resolve()
    state = plan_state(name, subnet, directory, count, balancers)
    _repair_or_refuse(state, say)
    directory.mkdir(parents=True, exist_ok=True)
    state.save()  # first, so a crash from here on is repaired by `lab down --dir`
    try:
        _bring_up(state, say, timeout_s)
        if wheels:
            wheelhouse.populate(directory / "wheelhouse", say)
        if model:
            lab_model.provide(directory / "model", say)
    except (LlamactlError, OSError, subprocess.SubprocessError) as exc:
        raise LlamactlError(
            f"lab up failed: {exc}\nthe partial lab is left for inspection; "
            f"`llamactl lab down --dir {directory}` removes it"
        ) from exc
    return state


def _bring_up(state: LabState, say: Say, timeout_s: float) -> None:
    directory, name = Path(state.dir), state.name
    t0 = time.monotonic()
    key = directory / "id_ed25519"
    if not key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"llamactl-lab-{name}",
                        "-f", str(key)], check=True, capture_output=True)
    authorized = (directory / "id_ed25519.pub").read_text()
    init = host.write_init_script(directory)
    hosts_file = inventory.hosts_file(state)
    prefixlen = int(state.subnet.split("/")[1])
    netns.create_bridge(state.bridge, state.bridge_address)

    def bring_up(h: LabHost) -> str:
        netns.create_host_net(h.netns, h.veth, state.bridge, h.address, prefixlen)
        h.cgroups = cgroups.create(_cgroup_name(state, h))
        pub = host.prepare(h, hosts_file, authorized)
        h.launcher, h.pid = host.start(h, init)
        return pub

    with ThreadPoolExecutor(max_workers=min(16, len(state.hosts))) as pool:
        keys = dict(zip([h.name for h in state.hosts], pool.map(bring_up, state.hosts)))
        state.save()
        list(pool.map(lambda h: wait_ready(h, timeout_s), state.hosts))
    say(f"{len(state.hosts)} hosts up (systemd running, sshd answering) in {time.monotonic() - t0:.1f} s")
    inventory.write_files(state, keys)


def sshd_answers(address: str, timeout_s: float = 2.0) -> bool:
    """True when something on port 22 greets us with an SSH banner."""
    try:
        with socket.create_connection((address, 22), timeout=timeout_s) as sock:
            sock.settimeout(timeout_s)
            return sock.recv(64).startswith(b"SSH-")
    except OSError:
        return False


def systemd_state(h: LabHost, timeout_s: float = 5.0, wait: bool = False) -> str:
    argv = host.nsenter_argv(h.pid, "systemctl", "is-system-running", *(["--wait"] if wait else [])) \
        if h.pid else None
    if argv is None or not host.is_alive(h.pid):
        return "stopped"
    try:
        out = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return "timeout"
    return out.stdout.strip() or out.stderr.strip() or "unknown"


def wait_ready(h: LabHost, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not sshd_answers(h.address, 0.5):
        if not host.is_alive(h.pid):
            raise LlamactlError(f"{h.name}: the host stopped while starting; see {h.state_dir}/console.log:\n"
                                + _tail(Path(h.state_dir) / "console.log"))
        if time.monotonic() > deadline:
            raise LlamactlError(f"{h.name}: sshd on {h.address}:22 not answering after {timeout_s:.0f} s "
                                f"(systemd: {systemd_state(h)}); see {h.state_dir}/console.log")
        time.sleep(0.05)
    left = max(1.0, deadline - time.monotonic())
    sys_state = systemd_state(h, timeout_s=left, wait=True)
    if sys_state not in ("running", "degraded"):
        raise LlamactlError(f"{h.name}: systemd is {sys_state!r} after boot")


def _tail(path: Path, lines: int = 10) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no console log)"


def _repair_or_refuse(state: LabState, say: Say) -> None:
    """Refuse while a lab of this name or in this DIR is running; tear down what a crash left."""
    old = load_state(Path(state.dir))
    leftovers = _leftovers(state.name)
    if old is not None and old.name != state.name:
        leftovers += _leftovers(old.name)
    live = [h.name for h in (old.hosts if old else []) if host.is_alive(h.pid) and _is_unshare(h.pid or 0)]
    if live:
        raise UsageError(
            f"{state.dir}: the lab {old.name if old else state.name!r} is running there ({', '.join(live)}); "
            f"run `llamactl lab down --dir {state.dir}` first, or use another --dir"
        )
    busy = [ns for ns in leftovers if netns.netns_pids(ns)]
    if busy:
        raise UsageError(
            f"--name {state.name}: a running lab uses this name (namespaces {', '.join(busy)}); run "
            f"`llamactl lab down --dir THAT_DIR` (or `llamactl lab down --name {state.name}`), or pick another --name"
        )
    if old is not None or leftovers or netns.link_exists(state.bridge):
        say("repairing: tearing down what an earlier lab left behind (its processes are gone)")
        if old is not None:
            teardown(old, say=lambda _m: None)
        teardown(_name_only(state), say=lambda _m: None)
    _check_subnet_free(state)


def _check_subnet_free(state: LabState) -> None:
    ours = ipaddress.IPv4Network(state.subnet)
    for dev, cidr in netns.networks_in_use():
        if ipaddress.IPv4Interface(cidr).network.overlaps(ours):
            raise UsageError(
                f"--subnet {state.subnet} overlaps {cidr} on {dev} (another lab, or this machine's network); "
                "pick another --subnet"
            )


def _name_only(state: LabState) -> LabState:
    """A state naming no hosts: its teardown removes only what the lab's name implies."""
    return LabState(state.name, state.subnet, state.dir, state.bridge, state.bridge_address, hosts=[])


def _leftovers(name: str) -> list[str]:
    return [ns for ns in netns.list_netns() if ns.startswith(name + "-")]


def teardown(state: LabState, say: Say) -> None:
    """Kill, unlink and remove everything of ``state``'s lab, including what its name implies
    (namespaces, links, cgroups a crash may have left unrecorded). Idempotent."""
    recorded = {h.netns: h for h in state.hosts}
    spaces = sorted(set(recorded) | set(_leftovers(state.name)))

    def kill(ns: str) -> None:
        h = recorded.get(ns)
        if h and h.pid and _is_unshare(h.pid):
            # Kill the host's systemd first: its PID namespace goes with it and `unshare`, still
            # alive, reaps it at once; then SIGKILL `unshare` (and anything else in the netns).
            init = host.systemd_pid(h.pid)
            if init is not None:
                netns.signal_and_wait(init, h.pid, timeout_s=3.0)
        netns.kill_netns_processes(ns, [h.pid] if h and h.pid and _is_unshare(h.pid) else [])
        if h and h.launcher:
            netns.reap(h.launcher)

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(kill, spaces))
    for ns in spaces:
        netns.delete_netns(ns)
    for link in netns.list_links(f"v{state.name}-"):
        netns.delete_link(link)
    netns.delete_link(state.bridge)
    groups = [g for h in state.hosts for g in h.cgroups]
    groups += cgroups.find_leftovers(f"llamactl-lab-{state.name}-")
    cgroups.remove(sorted(set(groups)))
    if state.hosts:  # a recorded lab: its per-host state dirs are ours to remove
        _unmount_under(Path(state.dir))
        shutil.rmtree(Path(state.dir) / "hosts", ignore_errors=True)
    say(f"lab {state.name!r}: {len(spaces)} hosts, links, cgroups and host state removed")


def _is_unshare(pid: int) -> bool:
    # A recorded pid may have been reused after a reboot or crash: only ever kill our `unshare`.
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "unshare"
    except OSError:
        return False


def _unmount_under(directory: Path) -> None:
    """Host mounts live in the hosts' own mount namespaces and die with them; this only catches a
    mount someone made in the machine's namespace under DIR, so that rmtree never walks into it."""
    prefix = str(directory) + "/"
    for line in reversed(Path("/proc/self/mountinfo").read_text().splitlines()):
        point = line.split()[4]
        if point.startswith(prefix):
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)


def down(directory: Path, name: str | None, say: Say) -> None:
    """Tear down the lab recorded in DIR, or (no state file there, e.g. after a crash) everything the
    lab name implies: namespaces, links, cgroups. Files are removed only from a recorded lab's DIR."""
    require_root("down")
    directory = directory.resolve()
    state = load_state(directory)
    if state is None:
        from llamactl.lab.state import DEFAULT_NAME, DEFAULT_SUBNET

        teardown(_name_only(plan_state(name or DEFAULT_NAME, DEFAULT_SUBNET, directory, 1)), say)
        return
    if name and name != state.name:
        raise UsageError(f"{directory}/{STATE_FILE}: holds the lab {state.name!r}, not --name {name!r}")
    teardown(state, say)
    for entry in MADE:
        path = directory / entry
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    try:
        directory.rmdir()
    except OSError:
        pass  # the user's own files are there


@dataclass
class HostStatus:
    name: str
    role: str
    address: str
    running: bool
    systemd: str
    sshd: bool


def status(directory: Path) -> tuple[LabState, list[HostStatus]]:
    require_root("status")
    directory = directory.resolve()
    state = load_state(directory)
    if state is None:
        raise UsageError(f"{directory}: no lab here (no {STATE_FILE}); start one with `llamactl lab up N --dir {directory}`")

    def one(h: LabHost) -> HostStatus:
        alive = host.is_alive(h.pid) and _is_unshare(h.pid or 0)
        return HostStatus(h.name, h.role, h.address, alive, systemd_state(h) if alive else "stopped",
                          alive and sshd_answers(h.address))

    with ThreadPoolExecutor(max_workers=8) as pool:
        return state, list(pool.map(one, state.hosts))
