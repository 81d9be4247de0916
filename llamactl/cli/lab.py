"""`llamactl lab up|down|status`: a local cluster of real test hosts (namespaces + systemd + sshd)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

DEFAULT_DIR = Path("lab")


def register(app: typer.Typer) -> None:
    lab = typer.Typer(
        name="lab",
        help="A local lab of real hosts (each: own netns, address, hostname, filesystem, systemd as PID 1, "
        "sshd) plus an nginx balancer host, to try llamactl without a GPU cluster. Needs root.\n\n"
        "Example: sudo llamactl lab up 3 --dir ./lab && llamactl deploy lab/inventory.yaml",
        no_args_is_help=True,
    )
    app.add_typer(lab, name="lab")

    @lab.command("up")
    def up(
        count: int = typer.Argument(..., metavar="N", help="Number of server hosts (lab-host1..N); a balancer lab-lb is added."),
        directory: Path = typer.Option(DEFAULT_DIR, "--dir", help="Where the inventory, keys, model, wheelhouse "
                                       "and per-host state go."),
        name: str = typer.Option("lab", "--name", help="Lab name (1-8 chars): prefixes netns, links, cgroups."),
        subnet: str = typer.Option("10.203.0.0/24", "--subnet", help="Lab network: bridge .1, lb .10, hostN .10+N."),
        model: bool = typer.Option(True, "--model/--no-model", help="Build the tiny checkpoint into DIR/model."),
        wheels: bool = typer.Option(True, "--wheelhouse/--no-wheelhouse",
                                    help="Fill DIR/wheelhouse with the server extra's wheels."),
        balancers: int = typer.Option(1, "--balancers", min=1, max=3,
                                      help="Balancer hosts (lab-lb, lab-lb2, ...); 2 or more share a VIP "
                                      "(keepalived, .250 of a /24) that the inventory's endpoint uses."),
    ) -> None:
        """Bring up N server hosts and a balancer host (or several sharing a floating address).

        Example: sudo llamactl lab up 3 --dir ./lab --balancers 2
        """
        from llamactl.lab import core

        state = core.up(count, directory, name, subnet, say=typer.echo, model=model, wheels=wheels,
                        balancers=balancers)
        d = Path(state.dir)
        typer.echo(f"inventory: {d / 'inventory.yaml'}\nendpoint:  {(d / 'endpoint').read_text().strip()}")
        typer.echo(f"next:      llamactl deploy {d / 'inventory.yaml'}")

    @lab.command("down")
    def down(
        directory: Path = typer.Option(DEFAULT_DIR, "--dir", help="The lab's directory."),
        name: str = typer.Option(None, "--name", help="Lab name, when DIR has no state file (after a crash)."),
    ) -> None:
        """Stop every host and remove namespaces, links, cgroups, processes and the files lab up wrote.

        Example: sudo llamactl lab down --dir ./lab
        """
        from llamactl.lab import core

        core.down(directory, name, say=typer.echo)

    @lab.command("status")
    def status(
        directory: Path = typer.Option(DEFAULT_DIR, "--dir", help="The lab's directory."),
        as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    ) -> None:
        """Show each lab host: address, systemd state, whether sshd answers.

        Example: sudo llamactl lab status --dir ./lab
        """
        from rich.console import Console
        from rich.table import Table

        from llamactl.lab import core

        state, rows = core.status(directory)
        if as_json:
            typer.echo(json.dumps({"name": state.name, "subnet": state.subnet, "hosts": [r.__dict__ for r in rows]}))
        else:
            table = Table(title=f"lab {state.name!r} ({state.subnet}) in {state.dir}")
            for col in ("host", "role", "address", "systemd", "sshd"):
                table.add_column(col)
            for r in rows:
                table.add_row(r.name, r.role, r.address, r.systemd, "answering" if r.sshd else "no")
            Console(no_color="NO_COLOR" in os.environ or None).print(table)
        healthy = all(r.sshd and r.systemd in ("running", "degraded") for r in rows)
        if not healthy:
            raise typer.Exit(1)
