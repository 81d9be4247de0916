"""Deploy's Redis step (inventory ``redis:``): read the Redis host's state, apply ``plan.redis``'s plan,
check it answers. Runs before the server hosts, so instances find Redis when they start."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llamactl.ops.hostplan import FileDiff, apply_plan
from llamactl.plan import redis as plan
from llamactl.plan.deploy import Run, Upload

if TYPE_CHECKING:
    from llamactl.inventory import Inventory
    from llamactl.remote.base import Executor


@dataclass
class RedisOutcome:
    host: str
    changes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # preflight: nothing was changed
    commands: list[str] = field(default_factory=list)  # dry run: what would run (display forms)
    diffs: list[FileDiff] = field(default_factory=list)  # dry run: rendered files next to the host's


def sync_redis(inv: Inventory, executor: Executor, dry_run: bool, say: Callable[[str], None]) -> RedisOutcome:
    """Bring Redis on ``executor`` (the ``redis:`` host) to the inventory's state; raises on a failed
    command, including a Redis that does not answer AUTH + PING afterwards."""
    assert inv.redis is not None
    say("redis: reading host state")
    facts = plan.parse_facts(executor.run(plan.facts_command(inv)).stdout)
    host_plan = plan.plan_redis(inv, facts)
    out = RedisOutcome(executor.host, changes=host_plan.changes, problems=host_plan.problems)
    if host_plan.problems:
        return out
    if dry_run:
        out.commands = [s.command.display() for s in host_plan.steps if isinstance(s, Run)]
        out.diffs = [FileDiff(s.remote_path, executor.read_bytes(s.remote_path), s.content, s.secret)
                     for s in host_plan.steps if isinstance(s, Upload) and s.content is not None]
        return out
    apply_plan(executor, host_plan, lambda msg: say(f"redis: {msg}"))
    say("redis: checking it answers")
    executor.run(plan.ping_command(inv), timeout_s=60)
    return out
