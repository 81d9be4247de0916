"""Deploy's Prometheus step: on every balancer host, after the balancer files (targets, rules) are in
place, bring ``llamactl-prometheus.service`` to what ``prometheus:`` asks, or remove it when the section is
gone. The decisions are ``llamactl.plan.prometheus``'s; this module reads facts and runs the plan."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from llamactl.ops.hostplan import apply_plan
from llamactl.plan import prometheus as prom
from llamactl.plan.deploy import HostPlan

if TYPE_CHECKING:
    from llamactl.inventory import Inventory
    from llamactl.remote.base import Executor


def rules_content(inv: Inventory) -> bytes | None:
    """The rules file the balancer hosts carry (``health.alerts``), or None without alerts."""
    if not inv.health.alerts.enabled:
        return None
    from llamactl.plan.alerts import rules_file

    return rules_file(inv)


def sync_host(inv: Inventory, executor: Executor, host: str, *, dry_run: bool,
              say: Callable[[str], None]) -> HostPlan:
    """One balancer host: the plan carried out (or only made, with ``dry_run``). Raises on a failed command."""
    if inv.prometheus is None:
        if dry_run:
            return HostPlan(host)
        removed = "removed" in executor.run(prom.remove_command()).stdout
        return HostPlan(host, changes=["removed the Prometheus service"] if removed else [])
    say("prometheus: reading host state")
    facts = prom.parse_facts(executor.run(prom.host_facts_command(inv, host)).stdout)
    plan = prom.plan(inv, host, rules_content(inv), facts)
    if plan.problems or dry_run:
        return plan
    apply_plan(executor, plan, lambda msg: say(f"prometheus: {msg}"))
    return plan


def sync_prometheus(inv: Inventory, executors: Mapping[str, Executor], *, dry_run: bool,
                    say: Callable[[str, str], None]) -> dict[str, HostPlan]:
    """Every balancer host in inventory order; a host whose command fails gets the error as a problem."""
    out: dict[str, HostPlan] = {}
    for bh in inv.balancer.hosts:
        def host_say(msg: str, name: str = bh.name) -> None:
            say(name, msg)

        try:
            out[bh.name] = sync_host(inv, executors[bh.name], bh.name, dry_run=dry_run, say=host_say)
        except Exception as exc:  # noqa: BLE001 - reported in the result like a host's failure
            out[bh.name] = HostPlan(bh.name, problems=[str(exc) or type(exc).__name__])
    return out
