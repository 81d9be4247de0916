"""The one lab fixture: a lab of 3 real hosts + a balancer per test session (``lab``), deployed once
(``deployed_lab``), plus when the lab can run at all (``lab_available``) and a shell on its hosts (``lab_sh``).

tests/lab checks the hosts themselves on it, tests/e2e and tests/ops operate the deployed cluster. Tests
that break something (kill a server, change a host key, stop a unit) must put it back, since later
modules share the same lab. Only tests of the lab's own lifecycle (up/down/crash) bring up labs of their
own, under other names.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from llamactl.lab.state import LabState, load_state

LLAMACTL = [sys.executable, "-m", "llamactl"]
LAB_NAME = "e2e"
LAB_SUBNET = "10.214.0.0/24"


@dataclass(frozen=True)
class Lab:
    dir: Path
    inventory: Path
    endpoint: str
    deploy_json: dict  # type: ignore[type-arg]
    controller_tx_bytes: int = 0  # what this machine sent into the lab's bridge during the first deploy

    @property
    def state(self) -> LabState:
        """The lab's hosts (names, addresses, processes), as ``llamactl lab up`` recorded them."""
        state = load_state(self.dir)
        assert state is not None, f"no lab state in {self.dir}"
        return state


def llamactl(*args: str, timeout: float = 900, check: bool = False, env: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*LLAMACTL, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "NO_COLOR": "1", **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"llamactl {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def lab_available() -> str | None:
    """None when this machine can run a lab, else why not (the reason a lab test is skipped)."""
    if os.geteuid() != 0:
        return "the lab needs root (network namespaces, mounts, cgroups)"
    for tool in ("ip", "unshare", "nsenter", "ssh-keygen", "nginx"):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            return f"the lab needs `{tool}` on this machine"
    for path in ("/lib/systemd/systemd", "/usr/sbin/sshd"):
        if not os.path.exists(path):
            return f"the lab needs {path}"
    return None


def lab_sh(lab: Lab, host: str, script: str, check: bool = True) -> str:
    """Run a shell script on a lab host (server or balancer) through llamactl's own SSH edge; its stdout."""
    from llamactl.inventory import load_inventory
    from llamactl.ops.connect import HostPool
    from llamactl.plan.command import Command

    with HostPool(load_inventory(lab.inventory)) as pool:
        return pool.executor(host).run(Command.sh(script), check=check).stdout


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    reason = lab_available()
    if reason:
        pytest.skip(reason)
    d = tmp_path_factory.mktemp("lab")
    llamactl("lab", "down", "--dir", str(d), "--name", LAB_NAME)  # leftovers of a crashed run
    up = llamactl("lab", "up", "3", "--dir", str(d), "--name", LAB_NAME, "--subnet", LAB_SUBNET, timeout=1200)
    if up.returncode != 0:
        llamactl("lab", "down", "--dir", str(d), "--name", LAB_NAME)
        raise AssertionError(f"lab up failed ({up.returncode}):\n{up.stdout}\n{up.stderr}")
    try:
        yield Lab(d, d / "inventory.yaml", (d / "endpoint").read_text().strip(), {})
    finally:
        down = llamactl("lab", "down", "--dir", str(d), "--name", LAB_NAME)
        assert down.returncode == 0, down.stderr


def bridge_tx_bytes(lab: Lab) -> int:
    """Bytes this machine (the controller) has sent into the lab network: the bridge's own counter, which
    does not count frames the bridge forwards from one host to another."""
    return int(Path(f"/sys/class/net/{lab.state.bridge}/statistics/tx_bytes").read_text())


@pytest.fixture(scope="session")
def deployed_lab(lab: Lab) -> Lab:
    before = bridge_tx_bytes(lab)
    proc = llamactl("deploy", str(lab.inventory), "--json", timeout=1500)
    assert proc.returncode == 0, f"first deploy failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return Lab(lab.dir, lab.inventory, lab.endpoint, json.loads(proc.stdout), bridge_tx_bytes(lab) - before)
