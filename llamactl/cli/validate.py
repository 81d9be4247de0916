"""`llamactl validate`: check an inventory and say what it describes (or every problem in it)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from llamactl.cli.inventory_arg import inventory_argument, load
from llamactl.errors import InventoryError
from llamactl.inventory import Inventory


def summary(inv: Inventory) -> str:
    instances = inv.instances()
    gpu = sum(1 for i in instances if i.gpu is not None)
    lbs = ", ".join(h.name for h in inv.balancer.hosts)
    hosts = "host" if len(inv.hosts) == 1 else "hosts"
    return (f"{inv.path}: valid: cluster {inv.cluster}, {len(inv.hosts)} {hosts}, {len(instances)} instances "
            f"({gpu} GPU, {len(instances) - gpu} CPU), balancer {lbs} at {inv.endpoint}")


def validate(
    inventory: Path | None = inventory_argument(),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
) -> None:
    """Check an inventory: exit 0 if valid, else 2 with one `FILE:LINE:COL: path: problem` line each.

    Example: llamactl validate inventory.yaml
    """
    if not as_json:
        typer.echo(summary(load(inventory)))
        return
    try:
        inv = load(inventory)
    except InventoryError as exc:
        problems = [
            {"file": p.file, "line": p.line, "column": p.column, "path": p.path, "message": p.message}
            for p in exc.problems
        ]
        typer.echo(json.dumps({"valid": False, "problems": problems}, indent=2))
        raise typer.Exit(exc.exit_code) from None
    instances = inv.instances()
    typer.echo(json.dumps({
        "valid": True,
        "cluster": inv.cluster,
        "hosts": [h.name for h in inv.hosts],
        "instances": [{"id": i.id, "url": i.url, "gpu": i.gpu} for i in instances],
        "balancer": [h.name for h in inv.balancer.hosts],
        "endpoint": inv.endpoint,
    }, indent=2))


def register(app: typer.Typer) -> None:
    app.command("validate")(validate)
