"""Rollback: point every host's `current` back to its previous release, then restart batch by batch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from llamactl.errors import LlamactlError
from llamactl.inventory import Inventory
from llamactl.ops.connect import Connector, connect_host
from llamactl.plan.command import Command, quote
from llamactl.plan.deploy import ENV_DIR, release_dir
from llamactl.plan.facts import gather_command, parse_facts
from llamactl.plan.rollback import previous_release
from llamactl.remote.parallel import run_parallel


@dataclass
class RollbackOutcome:
    host: str
    ok: bool
    frm: str | None = None
    to: str | None = None
    error: str | None = None


def _switch(inv: Inventory, name: str, to: str | None, connector: Connector) -> RollbackOutcome:
    spec = inv.host(name)
    try:
        ex = connector(spec.name, spec.address, spec.ssh)
    except LlamactlError as exc:
        return RollbackOutcome(name, False, error=str(exc))
    try:
        facts = parse_facts(ex.run(gather_command(
            spec.python, install_dir=spec.install_dir, files=[], wheelhouse_dir="/nonexistent", units=[],
            model_path=None, model_manifest=None, gpus=False, env_dir=ENV_DIR)).stdout)
        try:
            target = previous_release(facts, to=to)
        except ValueError as exc:
            return RollbackOutcome(name, False, facts.current, error=str(exc))
        if target is None:
            return RollbackOutcome(name, False, facts.current, error="no earlier release to roll back to")
        link = f"{spec.install_dir}/current"
        history = f"{spec.install_dir}/releases/.history"
        ex.run(Command.sh(
            f"ln -sfn {quote(release_dir(spec.install_dir, target))} {quote(link + '.new')} && "
            f"mv -T {quote(link + '.new')} {quote(link)} && echo {quote(target)} >> {quote(history)}",
            "activate the previous release"))
        return RollbackOutcome(name, True, facts.current, target)
    except LlamactlError as exc:
        return RollbackOutcome(name, False, error=str(exc))
    finally:
        ex.close()


def rollback(inv: Inventory, *, to: str | None = None, connector: Connector = connect_host,
             progress: Callable[[str, str], None] = lambda host, msg: None
             ) -> tuple[list[RollbackOutcome], str | None]:
    """Switch releases everywhere first (running servers are unaffected), then a rolling restart."""
    outcomes = run_parallel([h.name for h in inv.hosts], lambda n: _switch(inv, n, to, connector), max_workers=16)
    results = [o.value if o.ok else RollbackOutcome(n, False, error=str(o.error))  # type: ignore[union-attr]
               for n, o in zip([h.name for h in inv.hosts], outcomes)]
    switched = {r.host for r in results if r.ok}
    if not switched:
        return results, None
    from llamactl.ops.rolling import rolling_restart

    instances = [i for i in inv.instances() if i.host in switched]
    try:
        rolling_restart(inv, instances, progress=progress)
    except LlamactlError as exc:
        return results, str(exc)
    return results, None
