"""`llamactl render`: write every file deploy would place on each host into a local directory.

DIR/.llamactl-render.json (the manifest) lists the files each host got, relative to DIR/<host>. A later
render into the same DIR removes what the manifest listed and the new render no longer produces (an env
file of a GPU taken out of the inventory, every file of a host taken out), then the directories that left
empty. A file the manifest does not list is never removed. With --host, only that host's part changes.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer

from llamactl.cli.inventory_arg import inventory_argument, load
from llamactl.errors import UsageError
from llamactl.inventory.cluster import Inventory
from llamactl.plan.render import RenderedFile, render_all

MANIFEST = ".llamactl-render.json"
Manifest = dict[str, list[str]]  # host -> paths relative to DIR/<host>, sorted


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


def manifest_of(files: dict[str, dict[str, RenderedFile]]) -> Manifest:
    return {host: sorted(p.lstrip("/") for p in host_files) for host, host_files in files.items()}


def read_manifest(out: Path) -> tuple[Manifest, str | None]:
    """The previous render's manifest ({} when there is none) and a warning when it cannot be used."""
    path = out / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}, None
    except (OSError, ValueError) as exc:
        return {}, f"{path}: cannot read the render manifest ({exc}): no stale file removed; it is rewritten"
    hosts = data.get("hosts") if isinstance(data, dict) else None
    if not isinstance(hosts, dict) or not all(
            isinstance(h, str) and isinstance(v, list) and all(isinstance(p, str) for p in v)
            for h, v in hosts.items()):
        return {}, f"{path}: not a render manifest: no stale file removed; it is rewritten"
    return {h: list(v) for h, v in hosts.items()}, None


def stale(previous: Manifest, current: Manifest, replaced: set[str]) -> Manifest:
    """Files of the ``replaced`` hosts that the previous render wrote and this one does not (pure)."""
    gone: Manifest = {}
    for host in sorted(replaced):
        left = sorted(set(previous.get(host, [])) - set(current.get(host, [])))
        if left:
            gone[host] = left
    return gone


def remove_stale(out: Path, gone: Manifest) -> tuple[list[Path], Manifest]:
    """Delete the stale files (only regular files and links inside DIR/<host>), then every directory that
    became empty up to DIR/<host> itself. Returns what was removed and what could not be (kept listed)."""
    root = out.resolve()
    removed: list[Path] = []
    failed: Manifest = {}
    for host, rels in gone.items():
        base = root / host
        for rel in rels:
            target = root / host / rel
            try:
                parent = target.parent.resolve()
            except OSError:
                continue
            if not parent.is_relative_to(base) or target.name in ("", ".", ".."):
                continue  # a manifest edited to point elsewhere: never delete outside DIR/<host>
            target = parent / target.name
            try:
                if target.is_symlink() or target.is_file():
                    target.unlink()
                    removed.append(out / host / rel)
                else:
                    continue  # already gone, or now a directory: not ours to remove
            except OSError as exc:
                print(f"warning: cannot remove stale {out / host / rel}: {exc.strerror or exc}", file=sys.stderr)
                failed.setdefault(host, []).append(rel)
                continue
            directory = parent
            while directory != root and directory.is_relative_to(base):
                try:
                    directory.rmdir()  # only when empty
                except OSError:
                    break
                directory = directory.parent
    return removed, failed


def write_manifest(out: Path, manifest: Manifest) -> None:
    path = out / MANIFEST
    tmp = out / (MANIFEST + ".tmp")
    text = json.dumps({"version": 1, "written_by": "llamactl render", "hosts": dict(sorted(manifest.items()))},
                      indent=2) + "\n"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _add_keepalived(inv: Inventory, files: dict[str, dict[str, RenderedFile]]) -> None:
    """With ``balancer.vip.interface`` set, each balancer host's keepalived files (without it, the interface
    is found on each host at deploy time, so there is nothing to render offline)."""
    from llamactl.plan.keepalived import render_keepalived_files

    vip = inv.balancer.vip
    if vip is None or vip.interface is None:
        return
    for lb in inv.balancer.hosts:
        files.setdefault(lb.name, {}).update(render_keepalived_files(inv, lb, vip.interface))


def render(
    inventory: Path | None = inventory_argument(),
    out: Path = typer.Option(..., "--out", "-o", help="Directory to write DIR/<host>/<path> into."),
    host: str | None = typer.Option(None, "--host", help="Only this host (a server or balancer host name)."),
) -> None:
    """Render the systemd unit, env files, nginx config and Prometheus targets without touching any host.
    Files an earlier render wrote into DIR that this one no longer produces are removed (listed in
    DIR/.llamactl-render.json; other files in DIR are left alone).

    Example: llamactl render inventory.yaml --out rendered/
    """
    inv = load(inventory)
    files = render_all(inv)
    _add_keepalived(inv, files)
    if host is not None:
        if host not in files:
            raise UsageError(f"--host {host}: no such host in {inv.path} (hosts: {', '.join(files)})")
        files = {host: files[host]}
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    previous, warning = read_manifest(out)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    current = manifest_of(files)
    replaced = set(current) if host is not None else set(previous) | set(current)
    try:
        count = write_tree(out, files)
        removed, failed = remove_stale(out, stale(previous, current, replaced))
        manifest = {h: v for h, v in previous.items() if h not in replaced}
        for h in set(current) | set(failed):
            manifest[h] = sorted(current.get(h, []) + failed.get(h, []))
        write_manifest(out, manifest)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot write: {exc}") from None
    typer.echo(f"wrote {count} files for {len(files)} hosts under {out}")
    for path in removed:
        typer.echo(f"removed {path} (no longer rendered)")


def register(app: typer.Typer) -> None:
    app.command("render")(render)
