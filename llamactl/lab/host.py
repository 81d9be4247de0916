"""One lab host: its per-host state directory, the init script, and starting it with systemd as PID 1.

Per-host files are written into the host's overlay upper dirs *before* it starts, so the host boots
with its own hostname, machine-id, SSH host key and masked units, and nothing is copied at runtime.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path

from llamactl.errors import LlamactlError
from llamactl.lab.state import LabHost

OVERLAID = ("etc", "var", "usr", "home", "srv")  # copy-on-write per host
PRIVATE = ("opt", "root")  # empty per host
CONTAINER = "llamactl-lab"
CACHE_DIR = "/var/cache/llamactl-lab"  # wheel and model caches of `lab up`, hidden from hosts

# Units that would touch the shared machine (devices, kernel settings, clocks, consoles), periodic
# jobs, and services the image ships that a lab host has no use for.
MASKED = (
    "getty@.service", "console-getty.service", "serial-getty@.service", "getty.target",
    "systemd-remount-fs.service", "systemd-udevd.service", "systemd-udevd-control.socket",
    "systemd-udevd-kernel.socket", "systemd-udev-trigger.service", "systemd-udev-settle.service",
    "systemd-modules-load.service", "systemd-sysctl.service", "proc-sys-fs-binfmt_misc.automount",
    "proc-sys-fs-binfmt_misc.mount", "systemd-binfmt.service", "systemd-timesyncd.service",
    "systemd-pstore.service", "systemd-hwdb-update.service", "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount", "sys-kernel-config.mount", "sys-fs-fuse-connections.mount",
    "dev-hugepages.mount", "dev-mqueue.mount", "systemd-journald-audit.socket",
    "e2scrub_reap.service", "e2scrub_all.timer", "fstrim.timer", "apt-daily.timer",
    "apt-daily-upgrade.timer", "man-db.timer", "dpkg-db-backup.timer", "logrotate.timer",
    "postgresql.service", "prometheus.service", "prometheus-node-exporter.service",
    "prometheus-nginx-exporter.service",
    "cron.service", "rsyslog.service", "redis-server.service",
)

SSHD_DROPIN = """\
# Written by llamactl lab: only this host's own key, keys only, no reverse DNS (no resolver here).
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UseDNS no
"""

INIT_SH = r"""#!/bin/sh
# PID 1 of a lab host until it execs systemd. Runs inside the host's netns, mount, UTS, PID and
# cgroup namespaces (made by `unshare`); every mount below is private to this host.
set -eu
# Relative paths from here: cwd pins the state dir's real location, so the overlay over /var (or
# /usr, /home, /srv) never reroutes the paths of the layers mounted after it when DIR lives there.
cd "$LAB_STATE_DIR"
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs /sys          # this netns's view, read-only
mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys   # no sysctl reaches the kernel
for d in etc var usr home srv; do
  mount -t overlay overlay -o "lowerdir=/$d,upperdir=upper/$d,workdir=work/$d" "/$d"
done
mount --bind opt /opt
mount --bind root /root
cd /
# Host keys of the machine must not leak into a host: only its own ed25519 key is used.
rm -f /etc/ssh/ssh_host_rsa_key* /etc/ssh/ssh_host_ecdsa_key*
if [ "$LAB_ROLE" = balancer ]; then rm -f /etc/nginx/sites-enabled/default; fi
hostname "$LAB_HOSTNAME"
# A host sees nothing of the controller's lab files, wheel cache or pip config: whatever a deploy
# needs there must reach it over SSH, as on a real machine.
rm -f /etc/pip.conf && rm -rf /etc/xdg/pip
mount -t tmpfs -o mode=700,size=1m tmpfs "$LAB_DIR"
if [ -d "$LAB_CACHE" ]; then mount -t tmpfs -o mode=700,size=1m tmpfs "$LAB_CACHE"; fi
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
# Last: the state directory may itself live under /tmp or /run of the machine.
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
mount -t tmpfs -o mode=755,nosuid,nodev tmpfs /run
exec env -i container=llamactl-lab PATH=/usr/sbin:/usr/bin:/sbin:/bin /lib/systemd/systemd --system
"""

# The parent of a host's `unshare`. Its child moves into the host's cgroups, enters the netns and
# execs `unshare`; it stays outside those cgroups and reaps `unshare` the moment the host stops, so
# the cgroups empty at once (a zombie left to PID 1 of this machine keeps them busy for seconds).
_LAUNCH = """sh -c 'IFS=:; for c in $LAB_CGROUPS; do echo $$ > "$c/cgroup.procs"; done; exec "$@"' lab-host "$@" &
wait $!
"""


def write_init_script(lab_dir: Path) -> Path:
    path = lab_dir / "init.sh"
    path.write_text(INIT_SH)
    path.chmod(0o755)
    return path


def _mkdir(path: Path, mode: int = 0o755) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(mode)
    return path


def prepare(host: LabHost, hosts_file: str, authorized_key: str) -> str:
    """Create the host's state dir and pre-seed its /etc; return its SSH host public key line."""
    s = Path(host.state_dir)
    _mkdir(s, 0o700)
    for d in OVERLAID:
        _mkdir(s / "upper" / d)
        _mkdir(s / "work" / d)
    _mkdir(s / "opt")
    ssh_dir = _mkdir(_mkdir(s / "root", 0o700) / ".ssh", 0o700)
    (ssh_dir / "authorized_keys").write_text(authorized_key)
    (ssh_dir / "authorized_keys").chmod(0o600)

    etc = s / "upper" / "etc"
    (etc / "hostname").write_text(host.name + "\n")
    (etc / "hosts").write_text(hosts_file)
    (etc / "resolv.conf").write_text("# lab hosts have no resolver: fail fast\nnameserver 127.0.0.1\n")
    (etc / "machine-id").write_text(uuid.uuid4().hex + "\n")
    sshd_d = _mkdir(_mkdir(etc / "ssh") / "sshd_config.d")
    (sshd_d / "llamactl-lab.conf").write_text(SSHD_DROPIN)

    units = _mkdir(_mkdir(etc / "systemd") / "system")
    # keepalived runs only where a deploy configures it (balancer hosts with balancer.vip)
    masked = MASKED if host.role == "balancer" else (*MASKED, "nginx.service", "keepalived.service")
    for unit in masked:
        _symlink("/dev/null", units / unit)
    wants = _mkdir(units / "multi-user.target.wants")
    _symlink("/lib/systemd/system/ssh.service", wants / "ssh.service")
    if host.role == "balancer":
        _symlink("/lib/systemd/system/nginx.service", wants / "nginx.service")

    key = etc / "ssh" / "ssh_host_ed25519_key"
    if not key.exists():
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{host.name}", "-f", str(key)],
            check=True, capture_output=True,
        )
    return (etc / "ssh" / "ssh_host_ed25519_key.pub").read_text().strip()


def _symlink(target: str, link: Path) -> None:
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target)


def start(host: LabHost, init_script: Path, timeout_s: float = 10.0) -> tuple[int, int]:
    """Start the host; returns the pids of its launcher and of its `unshare`."""
    s = Path(host.state_dir)
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "LAB_STATE_DIR": str(s),
        "LAB_HOSTNAME": host.name,
        "LAB_ROLE": host.role,
        "LAB_CGROUPS": ":".join(host.cgroups),
        "LAB_DIR": str(s.parent.parent),
        "LAB_CACHE": CACHE_DIR,
    }
    argv = [
        "sh", "-c", _LAUNCH, "lab-launch",
        "nsenter", f"--net=/run/netns/{host.netns}",
        "unshare", "--mount", "--propagation", "private", "--uts", "--pid", "--cgroup",
        "--fork", "--mount-proc", "--kill-child=SIGKILL", str(init_script),
    ]
    with open(s / "console.log", "ab") as log:
        proc = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            cwd="/",
        )
    # The host outlives this Popen object: mark it settled so its finaliser does not warn;
    # `lab down` reaps the launcher when it is our child.
    proc.returncode = 0
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        child = _first_child(proc.pid)
        if child and _comm(child) == "unshare":
            return proc.pid, child
        time.sleep(0.005)
    raise LlamactlError(f"{host.name}: its `unshare` did not start; see {s / 'console.log'}")


def _first_child(pid: int) -> int | None:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def systemd_pid(unshare_pid: int) -> int | None:
    """The host's PID 1 as seen from the machine: the child of its `unshare`."""
    return _first_child(unshare_pid)


def nsenter_argv(unshare_pid: int, *command: str) -> list[str] | None:
    pid = systemd_pid(unshare_pid)
    if pid is None:
        return None
    return ["nsenter", "-t", str(pid), "-m", "-u", "-p", "-n", "-C", *command]


def is_alive(pid: int | None) -> bool:
    """True while the process runs (a zombie, exited but not yet reaped, counts as gone)."""
    if pid is None:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
