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
from llamactl.errors import OperationFailed

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


def _all_at_once(inv: Inventory, instances: list[Instance], console: Console) -> list[str]:
    """Restart every selected unit, hosts in parallel, printing one line per host. Returns the ids of
    the instances restarted; raises OperationFailed naming the hosts that failed."""
    from llamactl.ops.rolling import default_connect
    from llamactl.plan.command import Command
    from llamactl.remote.parallel import Err, run_parallel

    by_host: dict[str, list[Instance]] = {}
    for inst in instances:
        by_host.setdefault(inst.host, []).append(inst)

    def one(host: str) -> None:
        spec = inv.host(host)
        executor = default_connect(host, spec.address, spec.ssh)
        try:
            units = [i.unit for i in by_host[host]]
            executor.run(Command.of("systemctl", "reset-failed", *units), check=False)  # see rolling
            executor.run(Command.of("systemctl", "restart", *units))
        finally:
            executor.close()

    outcomes = run_parallel(list(by_host), one, max_workers=16)
    failed: list[str] = []
    restarted: list[str] = []
    for host, outcome in zip(by_host, outcomes):
        if isinstance(outcome, Err):
            failed.append(host)
            console.print(f"{host}: FAILED: {outcome.error}", markup=False, style="red")
        else:
            restarted += [i.id for i in by_host[host]]
            console.print(f"{host}: restarted {', '.join(i.unit for i in by_host[host])}", markup=False)
    if failed:
        raise _PartlyRestarted(f"restart failed on: {', '.join(failed)}", restarted)
    return restarted


class _PartlyRestarted(OperationFailed):
    def __init__(self, message: str, restarted: list[str]) -> None:
        super().__init__(message)
        self.restarted = restarted


def _audit_entry(inv: Inventory, restarted: list[str], ok: bool) -> dict[str, object]:
    """The audit log's view of a restart: which units it restarted, per host, and whether all went well."""
    by_id = {i.id: i for i in inv.instances()}
    hosts: dict[str, dict[str, list[str]]] = {}
    for inst_id in restarted:
        inst = by_id[inst_id]
        hosts.setdefault(inst.host, {"changes": []})["changes"].append(f"restart {inst.unit}")
    return {"release": None, "ok": ok, "changed": len(restarted), "hosts": hosts}


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
    from llamactl.ops import lock
    from llamactl.ops.rolling import RollingRestartFailed, default_connect, rolling_restart
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
    # Hold the deploy lock for the whole restart: a deploy (or a second restart) meanwhile would fight
    # over the balancer config and the units, and `watch` does not heal while it is held.
    lb = inv.balancer.hosts[0]
    lb_exec = default_connect(lb.name, lb.address, lb.ssh)
    try:
        with lock.held(lb_exec, command_line, force=force_unlock):
            if not rolling:
                restarted: list[str] = []
                try:
                    restarted = _all_at_once(inv, instances, console)
                except _PartlyRestarted as exc:
                    restarted = exc.restarted
                    raise
                finally:
                    ok = len(restarted) == len(instances)
                    lock.audit(lb_exec, command_line, _audit_entry(inv, restarted, ok))
                return
            console.print(f"rolling restart of {len(instances)} instance(s) in {len(batches)} batch(es), at "
                          f"most {max(len(b) for b in batches)} out of the balancer at once", markup=False)
            view = RollingView(console, [[i.id for i in b] for b in batches])
            done: list[str] = []
            ok = False  # until rolling_restart returns
            try:
                with view.live:
                    result = rolling_restart(inv, instances, on_event=view, batch=spec, force=force,
                                             balancer_executors={lb.name: lb_exec})
                done, ok = result.restarted, result.ok
            except RollingRestartFailed as exc:
                done = exc.result.restarted
                console.print(str(exc), markup=False, style="bold red")
                raise
            finally:
                lock.audit(lb_exec, command_line, _audit_entry(inv, done, ok))
    finally:
        lb_exec.close()
    console.print(result.summary(), markup=False, style="green")


def register(app: typer.Typer) -> None:
    app.command("restart")(restart)
