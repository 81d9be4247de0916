"""The rendered unit under real systemd 252 on a lab host (a Linux namespace), as root and as `llamactl`.

A stand-in for the server binary records what the sandbox allows: the env file arrives, the state
directory is writable and owned by the service user, the rest of the file system is read-only, the port
answers, and `systemctl stop` delivers SIGTERM and returns well within TimeoutStopSec.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from llamactl.inventory import Inventory, load_inventory
from llamactl.plan.command import Command
from llamactl.plan.render import render_host_files
from llamactl.remote.ssh import SSHExecutor, connect
from llamactl.remote.target import SSHTarget
from tests.labfixtures import lab_available

pytestmark = [pytest.mark.lab, pytest.mark.slow]

NAME = "unitlab"
STAND_IN = """#!/bin/sh
# Stand-in for `llamactl serve`: report what the sandbox allows, then serve HTTP on the instance port.
S=/var/lib/llamactl
id -un > $S/user
stat -c %U $S > $S/owner
echo "$LLAMACTL_INSTANCE $LLAMACTL_PORT $LLAMACTL_DEVICE" > $S/env
if touch /opt/llamactl/x 2>/dev/null; then echo writable; else echo read-only; fi > $S/opt
trap 'echo got-TERM > $S/term; exit 0' TERM
python3 -m http.server "$LLAMACTL_PORT" --bind "$LLAMACTL_HOST" >/dev/null 2>&1 &
wait
"""


def free_subnet() -> str:
    """A /24 no other lab (other test runs may be up in parallel) or interface uses right now."""
    used = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, check=False).stdout
    for third in range(230, 254):
        if f" 10.{third}." not in used:
            return f"10.{third}.0.0/24"
    pytest.skip("no free 10.x.0.0/24 subnet for a lab")


def lab_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llamactl", "lab", *args], capture_output=True, text=True,
                          timeout=300, check=False)


@pytest.fixture(scope="module")
def lab_inventory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    reason = lab_available()
    if reason:
        pytest.skip(reason)
    d = tmp_path_factory.mktemp("unitlab")
    lab_cli("down", "--dir", str(d), "--name", NAME)
    up = lab_cli("up", "1", "--dir", str(d), "--name", NAME, "--subnet", free_subnet(), "--no-model", "--no-wheelhouse")
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        yield d / "inventory.yaml"
    finally:
        lab_cli("down", "--dir", str(d), "--name", NAME)


def with_user(path: Path, user: str) -> Inventory:
    text = path.read_text().replace("  server:\n", f"  server:\n    user: {user}\n", 1)
    changed = path.with_name(f"inventory-{user}.yaml")
    changed.write_text(text)
    return load_inventory(changed, env={})


def sh(host: SSHExecutor, script: str) -> str:
    return host.run(Command.sh(script), timeout_s=60).stdout.strip()


@pytest.mark.parametrize("user", ["root", "llamactl"])
def test_unit_runs_sandboxed_and_stops_on_sigterm(lab_inventory: Path, user: str) -> None:
    inv = with_user(lab_inventory, user)
    spec = inv.hosts[0]
    target = SSHTarget.from_settings(spec.name, spec.address, spec.ssh)
    with connect(target) as host:
        if user != "root":  # what deploy does before installing the unit
            sh(host, "id -u llamactl >/dev/null 2>&1 || useradd --system --user-group --no-create-home "
                     "--home-dir /var/lib/llamactl --shell /usr/sbin/nologin llamactl")
        for path, rendered in render_host_files(inv, spec).items():
            host.put_bytes(rendered.content, path, rendered.mode)
        host.put_bytes(STAND_IN.encode(), f"{spec.install_dir}/current/bin/llamactl", 0o755)
        sh(host, "rm -rf /var/lib/llamactl && systemctl daemon-reload && systemctl start llamactl@0")
        port = spec.instances[0].port
        answered = sh(host, f"for i in $(seq 200); do python3 -c 'import urllib.request as u; "
                            f"print(u.urlopen(\"http://127.0.0.1:{port}/\").status)' 2>/dev/null && break; "
                            "sleep 0.1; done")
        status = sh(host, "systemctl status llamactl@0 --no-pager 2>&1; journalctl -u llamactl@0 --no-pager "
                          "| tail -5; ls -ld /opt/llamactl /opt/llamactl/current /opt/llamactl/current/bin || true")
        assert answered == "200", status
        assert sh(host, "systemctl is-active llamactl@0") == "active"
        assert sh(host, "cat /var/lib/llamactl/user /var/lib/llamactl/owner").split() == [user, user]
        assert sh(host, "cat /var/lib/llamactl/env") == f"{spec.name}/0 {port} cpu"
        assert sh(host, "cat /var/lib/llamactl/opt") == "read-only"
        stop = sh(host, "s=$(date +%s%N); systemctl stop llamactl@0; e=$(date +%s%N); echo $(( (e - s) / 1000000 ))")
        assert int(stop) < 5000
        assert sh(host, "cat /var/lib/llamactl/term; systemctl is-active llamactl@0 || true") == "got-TERM\ninactive"
        sh(host, "systemctl reset-failed llamactl@0 || true")
