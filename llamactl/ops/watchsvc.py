"""Deploy's last step: install (or remove) ``llamactl watch`` as a service on the first balancer host.

With ``health.watch: true`` the balancer host gets a controller-only release of llamactl (the server
hosts' python, install_dir and pip settings, and the same wheel), the placed inventory and SSH files
(0600) and the unit, enabled and (re)started when anything changed. Without it, a unit an earlier
deploy installed is stopped and removed. The files and commands come from ``llamactl.plan.watchsvc``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from llamactl.errors import LlamactlError
from llamactl.ops.hostplan import apply_plan, read_facts
from llamactl.ops.units import restart_units
from llamactl.plan import watchsvc
from llamactl.plan.deploy import DesiredHost, HostPlan, plan_host

if TYPE_CHECKING:
    from llamactl.inventory import Inventory
    from llamactl.plan.release import Release
    from llamactl.remote.base import Executor


def _document(inv: Inventory) -> dict[str, object]:
    """The inventory file's data with ``${VAR}``s filled in from this controller's environment."""
    from llamactl.inventory.yamltree import parse_yaml

    tree, _ = parse_yaml(inv.path.read_text(encoding="utf-8"), str(inv.path), os.environ)
    assert isinstance(tree.data, dict)  # the inventory loaded, so it is a mapping
    return tree.data


def desired_watch(inv: Inventory, release: Release) -> DesiredHost:
    """What the balancer host should run for watch (reads the SSH files the inventory names)."""
    first = inv.hosts[0]
    document, base, home = _document(inv), inv.path.parent, Path.home()
    contents: dict[Path, bytes] = {}
    for path in watchsvc.ssh_files(document, base, home):
        try:
            contents[path] = path.read_bytes()
        except OSError as exc:
            raise LlamactlError(f"health.watch: {path}, which the inventory's SSH settings name, cannot be "
                                f"read ({exc.strerror}): the watch service needs a copy of it") from None
    files = watchsvc.watch_files(inv, document, base, home, contents,
                                 llamactl_bin=f"{first.install_dir}/current/bin/llamactl")
    return DesiredHost(name=inv.balancer.hosts[0].name, python=first.python, install_dir=first.install_dir,
                       gpus=(), instances=(), files=files, release=release, pip=first.pip, extra="",
                       services=(watchsvc.WATCH_UNIT,))


def sync_watch(inv: Inventory, executor: Executor, release: Release, say: Callable[[str], None]) -> HostPlan:
    """Install, update or remove the watch service on ``executor`` (the first balancer host); returns
    what was done (``changes``) or why it could not be (``problems``). Raises on a failed command."""
    if not inv.health.watch:
        removed = "removed" in executor.run(watchsvc.remove_command()).stdout
        return HostPlan(executor.host, changes=["removed the watch service"] if removed else [])
    desired = desired_watch(inv, release)
    say("reading host state")
    plan = plan_host(desired, read_facts(executor, desired))
    if plan.problems:
        return plan
    apply_plan(executor, plan, say)
    for verb in ("start", "restart"):
        units = [a.unit for a in plan.actions if a.action == verb]
        if units:
            say(f"{verb} the watch service")
            restart_units(executor, units, verb)
    return plan
