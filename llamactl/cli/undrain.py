"""``llamactl undrain``: put an instance drained for a GPU fault back behind the balancer."""

from __future__ import annotations

import shlex
from pathlib import Path

import typer


def undrain_command(
    first: str | None = typer.Argument(None, metavar="INVENTORY", show_default=False,
                                       help="The inventory YAML file (default: $LLAMACTL_INVENTORY, else "
                                       "./inventory.yaml); with one argument, that argument is the INSTANCE."),
    second: str | None = typer.Argument(None, metavar="INSTANCE", show_default=False,
                                        help="The instance to put back, as host/index (e.g. gpu-01/0)."),
    force_unlock: bool = typer.Option(False, "--force-unlock", help="Remove a stale deploy lock first."),
) -> None:
    """Clear an instance's GPU fault record and put it back in the balancer. `watch` drains an instance whose
    GPU reports a hardware fault and never restarts it; after fixing the GPU (and restarting the instance),
    run this. Like deploy it holds the deploy lock and writes the audit line on the balancer host.

    Example: llamactl undrain inventory.yaml gpu-01/0
    """
    from llamactl.cli.console import console_for
    from llamactl.cli.inventory_arg import load
    from llamactl.errors import UsageError
    from llamactl.ops.gpufault import undrain

    if first is None:
        raise UsageError("missing argument INSTANCE (host/index, e.g. gpu-01/0)")
    inventory, instance = (None, first) if second is None else (Path(first), second)
    inv = load(inventory)
    err = console_for(stderr=True)
    command_line = shlex.join(["llamactl", "undrain", str(inv.path), instance])
    result = undrain(inv, instance, command_line=command_line, force_unlock=force_unlock,
                     say=lambda m: err.print(m, markup=False))
    drained = ", ".join(result.still_drained) or "none"
    console_for(stderr=False).print(f"{instance}: undrained (still drained for GPU faults: {drained})",
                                    markup=False)


def register(app: typer.Typer) -> None:
    app.command("undrain")(undrain_command)
