"""``status --deep`` against real lab hosts: systemd state and restart count read over real SSH.

A one-host lab of our own (name and subnet distinct from the shared e2e lab), no model or wheelhouse.
A crash-looping ``llamactl@0.service`` makes systemd count restarts, which status must report.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from llamactl.inventory import load_inventory
from llamactl.plan.command import Command
from llamactl.remote.ssh import SSHTarget, connect
from tests.labfixtures import lab_available, llamactl

pytestmark = [pytest.mark.lab, pytest.mark.slow]

NAME = "hsdeep"
SUBNET = "10.231.0.0/24"

CRASHING_UNIT = """[Unit]
Description=crash-looping stand-in for a llamactl server (status --deep test)
[Service]
ExecStart=/bin/sh -c 'sleep 0.2; exit 3'
Restart=always
RestartSec=0.3
"""


@pytest.fixture(scope="module")
def small_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    reason = lab_available()
    if reason:
        pytest.skip(reason)
    d = tmp_path_factory.mktemp("hslab")
    llamactl("lab", "down", "--dir", str(d), "--name", NAME)
    up = llamactl("lab", "up", "1", "--dir", str(d), "--name", NAME, "--subnet", SUBNET, "--no-model",
                  "--no-wheelhouse", timeout=300)  # fmt: skip
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        yield d / "inventory.yaml"
    finally:
        down = llamactl("lab", "down", "--dir", str(d), "--name", NAME)
        assert down.returncode == 0, down.stderr


def _status(inventory: Path) -> tuple[int, dict]:  # type: ignore[type-arg]
    proc = llamactl("status", str(inventory), "--deep", "--json", "--timeout", "1", timeout=120)
    return proc.returncode, json.loads(proc.stdout)


def test_deep_reads_unit_state_and_restart_count_over_ssh(small_lab: Path) -> None:
    code, doc = _status(small_lab)
    assert code == 1  # nothing serves yet
    (inst,) = doc["instances"]
    assert inst["id"] == "lab-host1/0" and inst["state"] == "down"
    assert inst["last_error"] == "GET /health: connection refused"
    assert inst["systemd"] == {
        "unit": "llamactl@0.service", "active_state": "inactive", "sub_state": "dead", "restarts": 0, "error": None,
    }  # fmt: skip

    inv = load_inventory(small_lab)
    host = inv.hosts[0]
    ssh = connect(SSHTarget.from_settings(host.name, host.address, host.ssh))
    try:
        ssh.put_bytes(CRASHING_UNIT.encode(), "/etc/systemd/system/llamactl@.service")
        ssh.run(Command.of("systemctl", "daemon-reload"))
        ssh.run(Command.of("systemctl", "start", "llamactl@0.service"))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            _, doc = _status(small_lab)
            if (doc["instances"][0]["systemd"]["restarts"] or 0) >= 2:
                break
            time.sleep(0.5)
    finally:
        ssh.run(Command.of("systemctl", "stop", "llamactl@0.service"), check=False)
        ssh.close()
    systemd = doc["instances"][0]["systemd"]
    assert systemd["restarts"] >= 2, systemd
    assert systemd["active_state"] in ("activating", "active", "failed") and systemd["error"] is None


def test_deep_names_an_unreachable_host(small_lab: Path, tmp_path: Path) -> None:
    # Same inventory, but the host's SSH port closed: systemd state is unknown and says why.
    text = small_lab.read_text().replace("    port: 22\n", "    port: 2\n", 1)
    broken = tmp_path / "inventory.yaml"
    broken.write_text(text)
    code, doc = _status(broken)
    assert code == 1
    systemd = doc["instances"][0]["systemd"]
    assert systemd["active_state"] is None and "lab-host1" in systemd["error"]
    assert "systemd: lab-host1" in doc["instances"][0]["last_error"]
