"""lab down leaves nothing; up repairs after a crash, refuses while running; non-root gets a clear error."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from llamactl.errors import UsageError
from llamactl.lab import core, netns
from llamactl.lab.state import LabState, load_state
from tests.lab.labhelpers import run, ssh
from tests.labfixtures import lab_available

pytestmark = pytest.mark.lab
NAME, SUBNET = "lc", "10.218.0.0/24"


def up(d: Path, count: int = 1, name: str = NAME, subnet: str = SUBNET) -> LabState:
    return core.up(count, d, name, subnet, say=lambda _m: None, model=False, wheels=False)


@pytest.fixture
def lab_dir(tmp_path: Path) -> Iterator[Path]:
    reason = lab_available()
    if reason:
        pytest.skip(reason)
    core.down(tmp_path / "lab", NAME, say=lambda _m: None)
    yield tmp_path / "lab"
    for d in tmp_path.iterdir():
        core.down(d, None, say=lambda _m: None)
    core.down(tmp_path / "none", NAME, say=lambda _m: None)


def leftovers(state: LabState) -> list[str]:
    found = [f"netns {n}" for n in netns.list_netns() if n.startswith(state.name + "-")]
    found += [f"link {n}" for n in netns.list_links(f"v{state.name}-") + netns.list_links(state.bridge)]
    found += [f"cgroup {g}" for h in state.hosts for g in h.cgroups if os.path.exists(g)]
    found += [f"process {p}" for h in state.hosts for p in (h.pid, h.launcher) if p and os.path.exists(f"/proc/{p}")]
    mounts = Path("/proc/self/mountinfo").read_text()
    found += [f"mount under {state.dir}"] if state.dir in mounts else []
    return found


def crash(state: LabState) -> None:
    """What a killed controller or a reboot leaves: hosts gone, everything else still there."""
    for h in state.hosts:
        assert h.pid and h.launcher
        os.kill(h.pid, signal.SIGKILL)
        os.waitpid(h.launcher, 0)  # the launcher exits once its `unshare` is gone
    deadline = time.monotonic() + 10
    while any(netns.netns_pids(h.netns) for h in state.hosts) and time.monotonic() < deadline:
        time.sleep(0.05)


def test_down_leaves_nothing_and_is_idempotent(lab_dir: Path) -> None:
    state = up(lab_dir, count=2)
    assert leftovers(state)  # the check sees a running lab
    core.down(lab_dir, None, say=lambda _m: None)
    assert leftovers(state) == []
    assert not lab_dir.exists()
    core.down(lab_dir, None, say=lambda _m: None)
    core.down(lab_dir, NAME, say=lambda _m: None)


def test_up_after_a_crash_repairs(lab_dir: Path, tmp_path: Path) -> None:
    first = up(lab_dir)
    crash(first)
    assert load_state(lab_dir) is not None and netns.list_netns().count(f"{NAME}-host1") == 1
    second = up(lab_dir)  # stale state file + leftover netns, links, cgroups: repaired
    with ssh(second, "lab-host1") as client:
        assert run(client, "hostname")[1].strip() == "lab-host1"
    crash(second)
    (lab_dir / "lab-state.json").unlink()  # a crash before the state file was written
    other = tmp_path / "other"
    third = up(other)
    assert third.hosts[1].netns == f"{NAME}-host1"
    with ssh(third, "lab-host1") as client:
        assert run(client, "systemctl is-system-running")[1].strip() == "running"
    core.down(other, None, say=lambda _m: None)
    assert leftovers(first) == leftovers(second) == leftovers(third) == []


def test_up_refuses_while_a_lab_runs(lab_dir: Path, tmp_path: Path) -> None:
    up(lab_dir)
    with pytest.raises(UsageError, match=rf"{lab_dir}: the lab 'lc' is running there .*lab down --dir {lab_dir}"):
        up(lab_dir)
    with pytest.raises(UsageError, match=r"--name lc: a running lab uses this name"):
        up(tmp_path / "second")
    with pytest.raises(UsageError, match=r"--subnet 10.218.0.0/25 overlaps 10.218.0.1/24 on br-lc"):
        up(tmp_path / "third", name="ld", subnet="10.218.0.0/25")
    assert not (tmp_path / "second").exists() and not (tmp_path / "third").exists()


@pytest.mark.parametrize("args", [["up", "1", "--dir", "/tmp/never-made"], ["down"], ["status"]])
def test_non_root_is_told_it_needs_root(args: list[str]) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user")
    proc = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "llamactl",
         "lab", *args],
        check=False, capture_output=True, text=True, timeout=60, cwd="/", env={"PATH": os.environ["PATH"], "NO_COLOR": "1"},
    )
    assert proc.returncode == 2, proc.stderr
    assert f"error: `llamactl lab {args[0]}` needs root" in " ".join(proc.stderr.split())
    assert "Traceback" not in proc.stderr
    assert not Path("/tmp/never-made").exists()
