"""`llamactl deploy`: thin command over llamactl.ops.deploy."""

from __future__ import annotations

import difflib
import json
import shlex
import sys
import threading
from pathlib import Path

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from llamactl.cli.console import console_for
from llamactl.cli.inventory_arg import inventory_argument, load
from llamactl.ops.deploy import DeployResult, HostOutcome, deploy, raise_for
from llamactl.ops.fanout import human
from llamactl.ops.hostplan import FileDiff
from llamactl.plan.deploy import Run, Upload

SECRET_MARKERS = ("API_KEY", "SECRET", "TOKEN", "PASSWORD", "REDIS_URL")
SECRET_DIRECTIVES = ("requirepass ",)  # redis.conf lines: `directive value`


class HostProgress:
    """A live per-host status table (to stderr, so --json output stays clean)."""

    def __init__(self, console: Console, hosts: list[str]) -> None:
        self.state = {h: "waiting" for h in hosts}
        self.lock = threading.Lock()
        self.live = Live(self._table(), console=console, refresh_per_second=8, transient=True)

    def _table(self) -> Table:
        table = Table(show_header=True, header_style="bold", box=None)
        table.add_column("host")
        table.add_column("step")
        for host, msg in self.state.items():
            style = "green" if msg == "done" else "red" if msg == "failed" else ""
            table.add_row(host, f"[{style}]{msg}[/{style}]" if style else msg)
        return table

    def __call__(self, host: str, message: str) -> None:
        with self.lock:
            self.state[host] = message
            self.live.update(self._table())


def _masked(text: str) -> str:
    return "\n".join(
        (line.split("=", 1)[0] + "=***") if "=" in line and any(m in line.split("=", 1)[0] for m in SECRET_MARKERS)
        else (line.split(" ", 1)[0] + " ***") if line.startswith(SECRET_DIRECTIVES)
        else line
        for line in text.splitlines()
    )


def _diff(d: FileDiff) -> str:
    old = _masked(d.old.decode(errors="replace")) if d.old is not None else ""
    new = _masked(d.new.decode(errors="replace"))
    lines = difflib.unified_diff(old.splitlines(), new.splitlines(),
                                 f"{d.path} (on host)" if d.old is not None else "/dev/null", f"{d.path} (new)",
                                 lineterm="")
    return "\n".join(lines)


def _print_redis_dry_run(console: Console, result: DeployResult) -> None:
    if result.redis is None and result.redis_error is None:
        return
    console.rule(f"[bold]redis ({result.redis.host if result.redis else 'not planned'})")
    if result.redis_error:
        console.print(f"[red]cannot plan:[/red] {result.redis_error}", markup=True)
        return
    assert result.redis is not None
    if not result.redis.changes:
        console.print("no changes")
    for change in result.redis.changes:
        console.print(f"  ~ {change}", markup=False)
    for command in result.redis.commands:
        console.print(f"  $ {command}", markup=False, soft_wrap=True)
    for d in result.redis.diffs:
        console.print(_diff(d), markup=False, highlight=False)


def _print_dry_run(console: Console, result: DeployResult) -> None:
    _print_redis_dry_run(console, result)
    for h in result.hosts:
        console.rule(f"[bold]{h.host}")
        if h.error:
            console.print(f"[red]cannot plan:[/red] {h.error}", markup=True)
            continue
        assert h.plan is not None
        if not h.plan.changes:
            console.print("no changes")
            continue
        for change in h.plan.changes:
            console.print(f"  ~ {change}", markup=False)
        for step in h.plan.steps:
            if isinstance(step, Run):
                console.print(f"  $ {step.command.display()}", markup=False, soft_wrap=True)
            elif isinstance(step, Upload) and step.local_path is not None:
                console.print(f"  upload {step.local_path} -> {step.remote_path}", markup=False)
        for d in h.diffs:
            console.print(_diff(d), markup=False, highlight=False)
    console.rule("[bold]balancer")
    if not result.balancer_diff:
        console.print("no changes")
    for d in result.balancer_diff:
        console.print(_diff(d), markup=False, highlight=False)


def _summary(console: Console, result: DeployResult) -> None:
    table = Table(title=f"deploy {'(dry run) ' if result.dry_run else ''}release {result.release_id}")
    table.add_column("host")
    table.add_column("result")
    table.add_column("changed", justify="right")
    table.add_column("time", justify="right")
    table.add_column("detail", overflow="fold")
    for h in result.hosts:
        table.add_row(h.host, "[green]ok[/green]" if h.ok else "[red]failed[/red]", str(len(h.changes)),
                      f"{h.duration_s:.1f}s", h.error or _brief(h))
    for step in result.sections:
        if step.shown:
            table.add_row(step.name, "[red]failed[/red]" if step.error else "[green]ok[/green]",
                          "" if step.changed is None else str(step.changed), "", step.error or step.detail)
    console.print(table)
    console.print(f"{result.changed} change(s) in {result.duration_s:.1f}s")
    if result.transfer is not None and (result.transfer.controller_bytes or result.transfer.peer_bytes):
        t = result.transfer
        console.print(f"files: {human(t.controller_bytes)} sent by this machine, {human(t.peer_bytes)} by peers "
                      f"({t.rounds} round(s), {t.duration_s:.1f}s)")


def _brief(h: HostOutcome) -> str:
    return "; ".join(h.changes[:3]) + (f" (+{len(h.changes) - 3} more)" if len(h.changes) > 3 else "")


def deploy_command(
    inventory: Path | None = inventory_argument(),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would change (diffs, commands); change nothing."),
    json_out: bool = typer.Option(False, "--json", help="Print a machine-readable result on stdout."),
    parallel: int = typer.Option(16, "--parallel", min=1, help="Hosts deployed at the same time."),
    wheel: Path | None = typer.Option(None, "--wheel", help="Deploy this llamactl wheel instead of building one."),
    force_unlock: bool = typer.Option(False, "--force-unlock", help="Remove a stale deploy lock first."),
    fanout: bool = typer.Option(True, "--fanout/--no-fanout",
                                help="Send each wheel and model file from this machine once; hosts fetch it from "
                                     "each other (authenticated, sha256-checked). --no-fanout: upload to every host."),
    peer_rate: float | None = typer.Option(None, "--peer-rate", min=0.1, metavar="MB/S",
                                              help="Cap what each host sends to its peers, in MB/s."),
) -> None:
    """Provision every host, start one server per GPU, wait until ready, then wire the balancer.

    Example: llamactl deploy inventory.yaml --dry-run
    """
    inv = load(inventory)
    err = console_for(stderr=True)
    out = console_for(stderr=False)
    progress = HostProgress(err, [h.name for h in inv.hosts] + [b.name for b in inv.balancer.hosts] + ["balancer"])
    argv = "llamactl " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    with progress.live:
        result = deploy(inv, dry_run=dry_run, parallel=parallel, wheel=wheel, force_unlock=force_unlock,
                        progress=progress, command_line=argv, fanout=fanout,
                        peer_rate_bytes_s=peer_rate * 1e6 if peer_rate else None)
    if json_out:
        print(json.dumps(result.to_json(), indent=2))
    else:
        if dry_run:
            _print_dry_run(out, result)
        _summary(out, result)
    raise_for(result)


def register(app: typer.Typer) -> None:
    app.command("deploy")(deploy_command)
