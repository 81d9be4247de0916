"""GPU fault records on the balancer host (``llamactl.plan.gpufault``) and ``llamactl undrain``.

``undrain`` is how an operator puts an instance that ``watch`` drained for a GPU fault back in service: under
the deploy lock, it removes the record, rewrites the balancer config with only the instances still recorded
drained, reloads nginx and writes the audit line. A running ``watch`` sees the record gone and stops holding it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llamactl.errors import UsageError
from llamactl.ops import lock as deploy_lock
from llamactl.ops.balancer import NginxControl, apply_balancer_config
from llamactl.ops.connect import Connector, HostPool
from llamactl.plan import gpufault as plan
from llamactl.remote.base import Executor

if TYPE_CHECKING:
    from llamactl.inventory import Inventory


def recorded(ex: Executor) -> frozenset[str]:
    """The instances with a GPU fault record."""
    return plan.parse_list(ex.run(plan.list_command()).stdout)


def write_record(ex: Executor, instance: str, detail: str) -> None:
    since = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    ex.put_bytes(plan.record(instance=instance, detail=detail, since=since), plan.record_path(instance))


@dataclass
class Undrained:
    instance: str
    was_recorded: bool
    still_drained: list[str] = field(default_factory=list)
    ok: bool = False

    def summary(self) -> dict[str, object]:
        host = self.instance.split("/", 1)[0]
        change = f"undrained {self.instance}" + ("" if self.was_recorded else " (no GPU fault was recorded)")
        return {"release": None, "ok": self.ok, "changed": 1 if self.ok else 0,
                "hosts": {host: {"changes": [change] if self.ok else []}}}


def undrain(inv: Inventory, instance: str, *, command_line: str, force_unlock: bool = False,
            connect: Connector | None = None, nginx: NginxControl | None = None,
            say: Callable[[str], None] = lambda _: None) -> Undrained:
    ids = [i.id for i in inv.instances()]
    if instance not in ids:
        raise UsageError(f"{instance}: no such instance in {inv.path} (instances: {', '.join(ids)})")
    result = Undrained(instance, was_recorded=False)
    with HostPool(inv, connect) as pool:
        lock_ex = pool.lock_host()
        with deploy_lock.guarded(lock_ex, command_line, result.summary, force=force_unlock):
            result.was_recorded = instance in recorded(lock_ex)
            lock_ex.run(plan.clear_command(instance))
            remaining = recorded(lock_ex) & set(ids)
            result.still_drained = sorted(remaining)
            say(f"{instance}: GPU fault record {'removed' if result.was_recorded else 'absent'}; "
                f"balancer config with {len(remaining)} instance(s) still drained")
            apply_balancer_config(inv, pool.balancers(), remaining, reason="undrain", nginx=nginx)
            result.ok = True
    return result
