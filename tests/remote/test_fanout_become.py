"""The fan-out through real SSH with ssh.become: a non-root user whose commands go through `sudo -n`
starts the peer server and the fetcher as root; files land root-owned, checked by sha256. Strict host keys."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable
from pathlib import Path

from llamactl.ops.fanout import Distributor
from llamactl.plan.fanout import HostNeeds, Item, plan_fanout
from llamactl.remote.ssh import SSHExecutor
from tests.remote.test_ssh_become import Users, open_as, pytestmark, server, users  # noqa: F401 - fixtures

__all__ = ["pytestmark"]


def test_fanout_through_sudo(users: Users, open_as: Callable[..., SSHExecutor], tmp_path: Path) -> None:  # noqa: F811
    name = users.add(sudo=True)
    root = users.root_dir(name)
    local = tmp_path / "model.bin"
    local.write_bytes(os.urandom(3_000_000))
    digest = hashlib.sha256(local.read_bytes()).hexdigest()
    # three "hosts" on one sshd, each with its own directory and its own SSH connection
    hosts = ["a", "b", "c"]
    executors = {h: open_as(name, become=True) for h in hosts}
    assert all(e.sudo for e in executors.values())
    needs = [HostNeeds(h, (Item(digest, local.stat().st_size, str(root / h / "model.bin"), 0o640),)) for h in hosts]
    plan = plan_fanout(needs)
    report = Distributor(plan, executors, {h: "127.0.0.1" for h in hosts}, {h: "/usr/bin/python3" for h in hosts},
                         {digest: local}, lambda h, m: None).run()
    assert report.controller_bytes == local.stat().st_size, report.to_json()
    assert report.peer_bytes == 2 * local.stat().st_size and sum(h.fallbacks for h in report.hosts.values()) == 0
    for h in hosts:
        target = root / h / "model.bin"
        assert hashlib.sha256(target.read_bytes()).hexdigest() == digest
        info = target.stat()
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (0, 0o640)
        assert sorted(p.name for p in target.parent.iterdir()) == ["model.bin"]
