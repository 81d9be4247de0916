"""``llamactl restart``: rolling (drain, restart, ready + canary, undrain) or all at once."""

from __future__ import annotations

import shlex
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from llamactl.cli.console import console_for
from llamactl.cli.inventory_arg import inventory_argument, inventory_path

if TYPE_CHECKING:
    from llamactl.inventory import Instance, Inventory
    from llamactl.ops.rolling import Progress

_STYLE = {"waiting": "dim", "drain": "cyan", "idle": "cyan", "restart": "yellow", "ready": "yellow",
          "canary": "yellow", "undrain": "green", "failed": "bold red"}


class RollingView:
    """A live table, one row per instance: batch, current step, last message (to stderr)."""

    def __init__(self, console: Console, batches: list[list[str]]) -> None:
        self.rows = {i: (n, "waiting", "") for n, batch in enumerate(batches, 1) for i in batch}
        self.total = len(batches)
        self.lock = threading.Lock()
        self.live = Live(self._table(), console=console, refresh_per_second=8, transient=False)

    def _table(self) -> Table:
        table = Table(box=None, header_style="bold")
        for name in ("batch", "instance", "step", "detail"):
            table.add_column(name, overflow="fold" if name == "detail" else "ellipsis")
        for inst, (n, step, detail) in self.rows.items():
            table.add_row(f"{n}/{self.total}", inst, Text(step, style=_STYLE.get(step, "")), detail)
        return table

    def __call__(self, p: Progress) -> None:
        if not p.instance:
            return
        with self.lock:
            n = self.rows.get(p.instance, (p.batch, "", ""))[0]
            step = "done" if p.step == "undrain" else p.step if p.ok else "failed"
            self.rows[p.instance] = (n, step, p.message)
            self.live.update(self._table())


def _select(inv: Inventory, limit: str | None, only: list[str]) -> list[Instance]:
    from llamactl.errors import UsageError
    from llamactl.inventory.select import limit as select_limit

    hosts = {h.name for h in select_limit(inv, limit)}
    chosen = [i for i in inv.instances() if i.host in hosts]
    if only:
        known = {i.id for i in inv.instances()}
        unknown = [o for o in only if o not in known]
        if unknown:
            raise UsageError(f"--instance {', '.join(unknown)}: no such instance in {inv.path} "
                             f"(instances: {', '.join(sorted(known))})")
        chosen = [i for i in chosen if i.id in set(only)]
    if not chosen:
        raise UsageError("nothing to restart: --limit and --instance select no instance")
    return chosen


def _command_line(inventory: Path, rolling: bool, batch: str | None, limit: str | None,
                  instances: list[str]) -> str:
    """What the lock file and the audit log say this command is (options that change what it does)."""
    argv = ["llamactl", "restart", str(inventory)] + (["--rolling"] if rolling else [])
    argv += ["--batch", batch] if batch else []
    argv += ["--limit", limit] if limit else []
    for one in instances:
        argv += ["--instance", one]
    return shlex.join(argv)


def restart(
    inventory: Path | None = inventory_argument(),
    rolling: bool = typer.Option(False, "--rolling", help="Batch by batch through the balancer, no request lost."),
    batch: str | None = typer.Option(
        None, "--batch", help="Instances per batch: a count or a percentage like 25% (default: rollout.batch)."),
    limit: str | None = typer.Option(None, "--limit", help="Only these hosts (comma-separated names or globs)."),
    instance: list[str] | None = typer.Option(
        None, "--instance", help="Only this instance, as host/index (repeatable)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    force: bool = typer.Option(False, "--force",
                               help="Allow restarting a cluster's only instance, or every instance in one batch."),
    force_unlock: bool = typer.Option(False, "--force-unlock", help="Remove a stale deploy lock first."),
) -> None:
    """Restart inference servers: with --rolling, never more than rollout.max_unavailable out of the
    balancer, each back only after /ready and a canary inference; the first failure stops the rollout
    and leaves only the failed instance drained (exit 1). Without --rolling, every selected instance
    restarts at once (service is interrupted), after a confirmation. Either way the restart holds the
    deploy lock on the balancer host (exit 1 while a deploy or another restart holds it) and is
    recorded in the audit log there.

    Example: llamactl restart inventory.yaml --rolling --batch 25%
    """
    from llamactl.inventory import load_inventory
    from llamactl.plan.batches import plan_batches

    path = inventory_path(inventory)
    inv = load_inventory(path)
    instances = _select(inv, limit, list(instance or []))
    console = console_for(stderr=True)
    command_line = _command_line(path, rolling, batch, limit, list(instance or []))
    spec: int | str = inv.rollout.batch if batch is None else (int(batch) if batch.isdigit() else batch)
    batches: list[list[Instance]] = []
    if rolling:
        batches = plan_batches(instances, spec, inv.rollout.max_unavailable,
                               cluster_size=len(inv.instances()), force=force)
    elif not yes:
        typer.confirm(f"Restart {len(instances)} instance(s) at once? In-flight requests on them fail "
                      "(use --rolling for no downtime)", abort=True, err=True)
    if rolling:
        _rolling(inv, instances, batches, console, command_line, spec=spec, force=force, force_unlock=force_unlock)
    else:
        _at_once(inv, instances, console, command_line, force_unlock=force_unlock)


def _at_once(inv: Inventory, instances: list[Instance], console: Console, command_line: str, *,
             force_unlock: bool) -> None:
    """Every selected unit at once, under the deploy lock, one line per host."""
    from llamactl.ops import lock
    from llamactl.ops.connect import HostPool
    from llamactl.ops.restart import PartlyRestarted, Restarted, restart_at_once

    def say(host: str, error: str | None) -> None:
        if error is not None:
            console.print(f"{host}: FAILED: {error}", markup=False, style="red")
        else:
            units = ", ".join(i.unit for i in instances if i.host == host)
            console.print(f"{host}: restarted {units}", markup=False)

    done = Restarted(inv)
    with HostPool(inv) as pool, lock.guarded(pool.lock_host(), command_line, done.summary, force=force_unlock):
        try:
            done.ids = restart_at_once(inv, instances, pool, say)
        except PartlyRestarted as exc:
            done.ids = exc.restarted
            raise
        finally:
            done.ok = len(done.ids) == len(instances)


def _rolling(inv: Inventory, instances: list[Instance], batches: list[list[Instance]], console: Console,
             command_line: str, *, spec: int | str, force: bool, force_unlock: bool) -> None:
    """Batch by batch through the balancer, under the deploy lock, with a live table."""
    from llamactl.ops import lock, rolling
    from llamactl.ops.connect import HostPool
    from llamactl.ops.restart import Restarted

    done = Restarted(inv)
    with HostPool(inv) as pool, lock.guarded(pool.lock_host(), command_line, done.summary, force=force_unlock):
        console.print(f"rolling restart of {len(instances)} instance(s) in {len(batches)} batch(es), at "
                      f"most {max(len(b) for b in batches)} out of the balancer at once", markup=False)
        view = RollingView(console, [[i.id for i in b] for b in batches])
        try:
            with view.live:
                result = rolling.rolling_restart(inv, instances, on_event=view, batch=spec, force=force, pool=pool)
            done.ids, done.ok = result.restarted, result.ok
        except rolling.RollingRestartFailed as exc:
            done.ids = exc.result.restarted
            console.print(str(exc), markup=False, style="bold red")
            raise
    console.print(result.summary(), markup=False, style="green")


def register(app: typer.Typer) -> None:
    app.command("restart")(restart)
