"""``llamactl logs``: a host's server logs (journalctl over SSH), streamed with -f until Ctrl-C."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from llamactl.inventory import Inventory
    from llamactl.plan.command import Command


def units_for(inv: Inventory, host: str, instance: int | None) -> list[str]:
    """The units of a server host (or one instance of it) or a balancer host; clear errors otherwise."""
    from llamactl.errors import UsageError

    for bh in inv.balancer.hosts:
        if bh.name == host:
            if instance is not None:
                raise UsageError(f"{host} is a balancer host: it runs no instance (drop --instance)")
            vrrp = ["keepalived.service"] if inv.balancer.vip is not None else []
            return ["nginx.service", "llamactl-watch.service", *vrrp]
    names = [h.name for h in inv.hosts]
    if host not in names:
        known = ", ".join(names + [f"{b.name} (balancer)" for b in inv.balancer.hosts])
        raise UsageError(f"{host}: no such host in {inv.path} (hosts: {known})")
    spec = inv.host(host)
    indices = [i.index for i in spec.instances]
    if instance is not None and instance not in indices:
        raise UsageError(f"{host}: no instance {instance} (instances: {', '.join(map(str, indices))})")
    chosen = [i for i in spec.instances if instance is None or i.index == instance]
    return [i.unit for i in chosen]


def follow(executor: Any, command: Command, out: Any = sys.stdout) -> int:
    """Stream a long-running command's output until it ends or Ctrl-C; returns its exit code.

    ``Executor.run`` collects output until exit, which ``journalctl -f`` never reaches, so this reads
    the SSH channel directly (a local executor runs the command as a child process instead)."""
    import subprocess

    transport = getattr(executor, "_transport", None)
    if transport is None:  # LocalExecutor: the same command as a child process
        proc = subprocess.Popen(["/bin/sh", "-c", command.shell()])
        try:
            return proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            return 130
    channel = transport(f"while running `{command.display()}`").open_session()
    channel.set_combine_stderr(True)
    channel.get_pty()  # closing the session then ends journalctl on the host too
    channel.exec_command(command.shell())
    try:
        while True:
            data = channel.recv(32768)
            if not data:
                break
            out.write(data.decode("utf-8", errors="replace").replace("\r\n", "\n"))  # a PTY's CRLF
            out.flush()
        return int(channel.recv_exit_status())
    except KeyboardInterrupt:
        return 130
    finally:
        channel.close()


def split_arguments(first: str | None, second: str | None) -> tuple[Path | None, str]:
    """``logs HOST`` or ``logs INVENTORY HOST``: (inventory or None, host). The inventory is optional
    although it comes first, so one argument is the host."""
    from llamactl.errors import UsageError

    if first is None:
        raise UsageError("missing argument HOST (a host name from the inventory)")
    if second is None:
        return None, first
    return Path(first), second


def logs(
    first: str | None = typer.Argument(None, metavar="INVENTORY", show_default=False,
                                       help="The inventory YAML file (default: $LLAMACTL_INVENTORY, else "
                                       "./inventory.yaml); with one argument, that argument is the HOST."),
    second: str | None = typer.Argument(None, metavar="HOST", show_default=False,
                                        help="A server host (or balancer host) name from the inventory."),
    instance: int | None = typer.Option(
        None, "--instance", "-i", help="Only this instance index (default: every instance on the host)."),
    follow_: bool = typer.Option(False, "--follow", "-f", help="Keep streaming new lines until Ctrl-C."),
    lines: int = typer.Option(100, "--lines", "-n", min=0, help="How many past lines to show."),
) -> None:
    """Show a host's inference server logs (journalctl -u llamactl@N.service over SSH).

    Example: llamactl logs inventory.yaml gpu-01 --instance 0 -f
    """
    from llamactl.cli.inventory_arg import load
    from llamactl.ops.connect import HostPool
    from llamactl.plan.units import journal_command

    inventory, host = split_arguments(first, second)
    inv = load(inventory)
    units = units_for(inv, host, instance)
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    command = journal_command(units, lines, follow_, color=color)
    with HostPool(inv) as pool:
        executor = pool.executor(host)
        if follow_:
            code = follow(executor, command)
            raise typer.Exit(0 if code in (0, 130) else code)
        result = executor.run(command)
        sys.stdout.write(result.stdout)


def register(app: typer.Typer) -> None:
    app.command("logs")(logs)
