"""Rollback: point every host's `current` back to its previous release, then restart batch by batch.

It holds the deploy lock for its whole run and leaves an audit line, as deploy and restart do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from llamactl.errors import LlamactlError
from llamactl.inventory import Inventory
from llamactl.ops import lock as deploy_lock
from llamactl.ops.connect import Connector, HostPool
from llamactl.ops.restart import Restarted
from llamactl.plan.facts import parse_facts
from llamactl.plan.release import activate_command
from llamactl.plan.rollback import previous_release, releases_command
from llamactl.remote.parallel import run_parallel


@dataclass
class RollbackOutcome:
    host: str
    ok: bool
    frm: str | None = None
    to: str | None = None
    error: str | None = None


def _switch(inv: Inventory, name: str, to: str | None, pool: HostPool) -> RollbackOutcome:
    spec = inv.host(name)
    try:
        ex = pool.executor(name)
        facts = parse_facts(ex.run(releases_command(spec.python, spec.install_dir)).stdout)
        try:
            target = previous_release(facts, to=to)
        except ValueError as exc:
            return RollbackOutcome(name, False, facts.current, error=str(exc))
        if target is None:
            return RollbackOutcome(name, False, facts.current, error="no earlier release to roll back to")
        ex.run(activate_command(spec.install_dir, target, "activate the previous release"))
        return RollbackOutcome(name, True, facts.current, target)
    except LlamactlError as exc:
        return RollbackOutcome(name, False, error=str(exc))
    finally:
        pool.drop(name)


def rollback(inv: Inventory, *, to: str | None = None, connector: Connector | None = None,
             progress: Callable[[str, str], None] = lambda host, msg: None, force_unlock: bool = False,
             command_line: str = "llamactl rollback") -> tuple[list[RollbackOutcome], str | None]:
    """Switch releases everywhere first (running servers are unaffected), then a rolling restart, all
    under the deploy lock. Returns every host's outcome and the rolling restart's error, if any."""
    from llamactl.ops.rolling import RollingRestartFailed, rolling_restart

    done = Restarted(inv)
    rolling_error: str | None = None
    with HostPool(inv, connector) as pool, deploy_lock.guarded(pool.lock_host(), command_line, done.summary,
                                                              force=force_unlock):
        names = [h.name for h in inv.hosts]
        outcomes = run_parallel(names, lambda n: _switch(inv, n, to, pool), max_workers=16)
        results = [o.value if o.ok else RollbackOutcome(n, False, error=str(o.error))  # type: ignore[union-attr]
                   for n, o in zip(names, outcomes)]
        switched = {r.host for r in results if r.ok}
        done.release = next((r.to for r in results if r.ok), None)
        done.ok = all(r.ok for r in results)
        if switched:
            instances = [i for i in inv.instances() if i.host in switched]
            try:
                done.ids = rolling_restart(inv, instances, pool=pool, progress=progress, reason="rollback").restarted
            except RollingRestartFailed as exc:
                done.ids, done.ok, rolling_error = exc.result.restarted, False, str(exc)
            except LlamactlError as exc:
                done.ok, rolling_error = False, str(exc)
    return results, rolling_error
