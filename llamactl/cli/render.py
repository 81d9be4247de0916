"""`llamactl render`: write every file deploy would place on each host into a local directory."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from llamactl.errors import UsageError
from llamactl.inventory import load_inventory
from llamactl.plan.render import RenderedFile, render_all


def write_tree(out: Path, files: dict[str, dict[str, RenderedFile]]) -> int:
    """Write ``out/<host>/<absolute path>`` with each file's mode; returns the number written."""
    root = out.resolve()
    count = 0
    for host, host_files in files.items():
        for abs_path, rendered in host_files.items():
            target = (root / host / abs_path.lstrip("/")).resolve()
            if not target.is_relative_to(root / host):  # a path with .. must not escape DIR/<host>
                raise UsageError(f"{host}: refusing to write {abs_path} outside {root / host}")
            target.parent.mkdir(parents=True, exist_ok=True)
            # Created with its final mode, so a secret file is never briefly world-readable.
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, rendered.mode)
            try:
                os.fchmod(fd, rendered.mode)
                os.write(fd, rendered.content)
            finally:
                os.close(fd)
            count += 1
    return count


def render(
    inventory: Path = typer.Argument(..., help="The inventory YAML file."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory to write DIR/<host>/<path> into."),
    host: str | None = typer.Option(None, "--host", help="Only this host (a server or balancer host name)."),
) -> None:
    """Render the systemd unit, env files, nginx config and Prometheus targets without touching any host.

    Example: llamactl render inventory.yaml --out rendered/
    """
    inv = load_inventory(inventory)
    files = render_all(inv)
    if host is not None:
        if host not in files:
            raise UsageError(f"--host {host}: no such host in {inventory} (hosts: {', '.join(files)})")
        files = {host: files[host]}
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    try:
        count = write_tree(out, files)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot write: {exc}") from None
    typer.echo(f"wrote {count} files for {len(files)} hosts under {out}")


def register(app: typer.Typer) -> None:
    app.command("render")(render)
