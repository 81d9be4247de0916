"""Rendered units pass `systemd-analyze verify` with an empty stderr (it exits 0 even for typos)."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

from llamactl.inventory import HostSpec, Inventory
from llamactl.plan.render import UNIT_PATH, render_host_files
from tests.render.tools import load, need


def verify(unit_text: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    tool = need("systemd-analyze")
    unit_dir = tmp / "units"
    unit_dir.mkdir(exist_ok=True)
    (unit_dir / "llamactl@.service").write_text(unit_text)
    return subprocess.run(
        [tool, "verify", "--man=no", str(unit_dir / "llamactl@0.service")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=unit_dir,
    )


def with_install_dir(inv: Inventory, host: HostSpec, install_dir: Path) -> tuple[Inventory, HostSpec]:
    moved = dataclasses.replace(host, install_dir=str(install_dir))
    hosts = [moved if h.name == host.name else h for h in inv.hosts]
    return dataclasses.replace(inv, hosts=hosts), moved


def fake_install(tmp: Path) -> Path:
    """The ExecStart binary exists on real hosts only; give verify one so nothing may be reported."""
    binary = tmp / "install" / "current" / "bin" / "llamactl"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(0o755)
    return tmp / "install"


def test_unit_verifies_clean_for_every_fixture(tmp_path: Path) -> None:
    install = fake_install(tmp_path)
    for name in ("small", "many", "example"):
        inv = load(name)
        for host in inv.hosts:
            inv2, moved = with_install_dir(inv, host, install)
            unit = render_host_files(inv2, moved)[UNIT_PATH].content.decode()
            result = verify(unit, tmp_path)
            assert result.stderr == "", f"{name}/{host.name}: {result.stderr}"
            assert result.returncode == 0


def test_only_the_missing_binary_is_reported_for_the_real_path(tmp_path: Path) -> None:
    inv = load("example")
    unit = render_host_files(inv, inv.hosts[0])[UNIT_PATH].content.decode()
    result = verify(unit, tmp_path)
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "llamactl@0.service: Command /opt/llamactl/current/bin/llamactl is not executable: "
        "No such file or directory"
    ], result.stderr


def test_verify_would_catch_a_typo(tmp_path: Path) -> None:
    """Guards the guard: the empty-stderr assertion above can fail."""
    install = fake_install(tmp_path)
    inv, host = with_install_dir(load("small"), load("small").hosts[0], install)
    unit = render_host_files(inv, host)[UNIT_PATH].content.decode().replace("Type=exec", "Type=exce")
    assert "Failed to parse service type, ignoring: exce" in verify(unit, tmp_path).stderr
