"""Shared lab fixtures: one lab of 3 real hosts + a balancer per test session, deployed once.

Tests that break something (kill a server, change a host key, stop a unit) must put it back, since
later modules (tests/e2e, tests/ops) share the same deployed lab.
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

LLAMACTL = [sys.executable, "-m", "llamactl"]
LAB_NAME = "e2e"
LAB_SUBNET = "10.214.0.0/24"


@dataclass(frozen=True)
class Lab:
    dir: Path
    inventory: Path
    endpoint: str
    deploy_json: dict  # type: ignore[type-arg]


def llamactl(*args: str, timeout: float = 900, check: bool = False, env: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*LLAMACTL, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "NO_COLOR": "1", **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"llamactl {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def lab_available() -> str | None:
    if os.geteuid() != 0:
        return "the lab needs root"
    for tool in ("ip", "unshare", "nsenter", "nginx"):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            return f"the lab needs {tool}"
    return None


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


@pytest.fixture(scope="session")
def deployed_lab(lab: Lab) -> Lab:
    proc = llamactl("deploy", str(lab.inventory), "--json", timeout=1500)
    assert proc.returncode == 0, f"first deploy failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return Lab(lab.dir, lab.inventory, lab.endpoint, json.loads(proc.stdout))
