"""`llamactl rollback`: return every host to its previous release."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from llamactl.cli.console import console_for
from llamactl.cli.inventory_arg import inventory_argument, load
from llamactl.errors import OperationFailed


def rollback_command(
    inventory: Path | None = inventory_argument(),
    to: Optional[str] = typer.Option(None, "--to", help="A release id to return to (default: the previous one)."),  # noqa: UP007
    force_unlock: bool = typer.Option(False, "--force-unlock", help="Remove a stale deploy lock first."),
) -> None:
    """Activate the previous release on every host, then restart instances batch by batch. Like deploy,
    it holds the deploy lock on the balancer host and is recorded in the audit log there.

    Example: llamactl rollback inventory.yaml
    """
    from llamactl.ops.rollback import rollback

    inv = load(inventory)
    console = console_for(stderr=False)
    command_line = shlex.join(["llamactl", "rollback", str(inventory)] + (["--to", to] if to else []))
    err = console_for(stderr=True)
    results, rolling_error = rollback(inv, to=to, force_unlock=force_unlock, command_line=command_line,
                                      progress=lambda h, m: err.print(f"{h}: {m}", markup=False))
    table = Table(title="rollback")
    for col in ("host", "result", "from", "to", "detail"):
        table.add_column(col)
    for r in results:
        table.add_row(r.host, "ok" if r.ok else "failed", r.frm or "-", r.to or "-", r.error or "")
    console.print(table)
    if rolling_error:
        console.print(f"rolling restart failed: {rolling_error}", markup=False)
    if rolling_error or not all(r.ok for r in results):
        raise OperationFailed("rollback did not complete on every host")


def register(app: typer.Typer) -> None:
    app.command("rollback")(rollback_command)
