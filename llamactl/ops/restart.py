"""Restarting instances outside a deploy: all at once (``restart`` without ``--rolling``), and the audit
record that restart and rollback leave (which units they restarted, per host)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llamactl.errors import OperationFailed
from llamactl.ops.units import restart_units
from llamactl.remote.parallel import Err, run_parallel

if TYPE_CHECKING:
    from llamactl.inventory import Instance, Inventory
    from llamactl.ops.connect import HostPool


@dataclass
class Restarted:
    """What a restart or rollback did so far; ``summary`` is its audit record (``ops.lock.guarded``)."""

    inv: Inventory
    ids: list[str] = field(default_factory=list)
    ok: bool = False
    release: str | None = None

    def summary(self) -> dict[str, object]:
        by_id = {i.id: i for i in self.inv.instances()}
        hosts: dict[str, dict[str, list[str]]] = {}
        for inst_id in self.ids:
            inst = by_id[inst_id]
            hosts.setdefault(inst.host, {"changes": []})["changes"].append(f"restart {inst.unit}")
        return {"release": self.release, "ok": self.ok, "changed": len(self.ids), "hosts": hosts}


class PartlyRestarted(OperationFailed):
    def __init__(self, message: str, restarted: list[str]) -> None:
        super().__init__(message)
        self.restarted = restarted


def restart_at_once(inv: Inventory, instances: Sequence[Instance], pool: HostPool,
                    say: Callable[[str, str | None], None]) -> list[str]:
    """Restart every selected unit, hosts in parallel; ``say(host, error or None)`` once per host.
    Returns the ids restarted; raises PartlyRestarted naming the hosts that failed."""
    by_host: dict[str, list[Instance]] = {}
    for inst in instances:
        by_host.setdefault(inst.host, []).append(inst)

    def one(host: str) -> None:
        executor, lock = pool.get(host)
        with lock:
            restart_units(executor, [i.unit for i in by_host[host]])

    outcomes = run_parallel(list(by_host), one, max_workers=16)
    failed: list[str] = []
    restarted: list[str] = []
    for host, outcome in zip(by_host, outcomes):
        if isinstance(outcome, Err):
            failed.append(host)
            say(host, str(outcome.error))
        else:
            restarted += [i.id for i in by_host[host]]
            say(host, None)
    if failed:
        raise PartlyRestarted(f"restart failed on: {', '.join(failed)}", restarted)
    return restarted
