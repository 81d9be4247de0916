"""User errors of restart / watch / logs: a clear message and exit code 2, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Two CPU hosts and a balancer: every address unreachable, nothing here may connect for real.
INVENTORY = (Path(__file__).resolve().parents[1] / "fixtures/inventories/two-cpu-hosts.yaml").read_text()


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llamactl", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}, check=False)


@pytest.fixture
def inventory(tmp_path: Path) -> str:
    path = tmp_path / "inventory.yaml"
    path.write_text(INVENTORY)
    return str(path)


def test_restart_unknown_instance(inventory: str) -> None:
    proc = run("restart", inventory, "--rolling", "--instance", "h9/0")
    assert proc.returncode == 2
    assert f"error: --instance h9/0: no such instance in {inventory} (instances: h1/0, h2/0)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_restart_bad_batch_and_limit(inventory: str) -> None:
    proc = run("restart", inventory, "--rolling", "--batch", "0%")
    assert proc.returncode == 2 and "batch: found '0%'" in proc.stderr
    proc = run("restart", inventory, "--rolling", "--limit", "nope")
    assert proc.returncode == 2 and "'nope' matches no host" in proc.stderr


def test_restart_all_at_once_asks_first(inventory: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "llamactl", "restart", inventory], input="n\n",
                          capture_output=True, text=True, timeout=60, check=False)
    assert "Restart 2 instance(s) at once?" in proc.stderr
    assert proc.returncode != 0 and "Traceback" not in proc.stderr


def test_logs_unknown_host_lists_known_hosts(inventory: str) -> None:
    proc = run("logs", inventory, "gpu-7")
    assert proc.returncode == 2
    assert "gpu-7: no such host" in proc.stderr and "(hosts: h1, h2, lb (balancer))" in proc.stderr


def test_missing_inventory(tmp_path: Path) -> None:
    proc = run("watch", str(tmp_path / "nope.yaml"), "--once")
    assert proc.returncode == 2 and "no such inventory file" in proc.stderr
