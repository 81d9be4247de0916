"""``watch`` as a service on the first balancer host (inventory ``health.watch: true``). Pure.

Deploy installs a controller-only release of llamactl there (no server extra), places a copy of the
inventory and the SSH files it names (0600, under ``WATCH_DIR``) and runs ``llamactl watch`` as the
systemd unit ``WATCH_UNIT``. The placed inventory is the controller's, with ``${VAR}``s already filled in,
its SSH paths pointing at the placed copies, and what watch never uses (API keys, model uploads,
wheelhouses) left out, so no API key reaches the balancer host.
"""

from __future__ import annotations

import copy
import importlib.resources
import os
import posixpath
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import yaml

from llamactl.plan.command import Command, quote
from llamactl.plan.render import RenderedFile

if TYPE_CHECKING:
    from llamactl.inventory import Inventory

WATCH_UNIT = "llamactl-watch.service"
WATCH_UNIT_PATH = f"/etc/systemd/system/{WATCH_UNIT}"
WATCH_DIR = "/etc/llamactl/watch"
WATCH_INVENTORY = f"{WATCH_DIR}/inventory.yaml"
WATCH_LOG = "/var/log/llamactl/watch.log"
SSH_PATHS = ("identity_file", "known_hosts")
DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"


def local_path(value: str, base: Path, home: Path) -> Path:
    """A controller path as the inventory loader takes it: ``~`` is ``home``, relative ones from ``base``."""
    if value == "~" or value.startswith("~/"):
        return home / value[2:]
    path = Path(value)
    return path if path.is_absolute() else Path(os.path.normpath(base / path))


def _ssh_mappings(document: Any) -> list[dict[str, Any]]:
    """Every ``ssh:`` mapping of the document (defaults, groups, hosts, balancer hosts)."""
    found: list[dict[str, Any]] = []
    if isinstance(document, dict):
        for key, value in document.items():
            if key == "ssh" and isinstance(value, dict):
                found.append(value)
            else:
                found += _ssh_mappings(value)
    elif isinstance(document, list):
        for item in document:
            found += _ssh_mappings(item)
    return found


def ssh_files(document: Mapping[str, Any], base: Path, home: Path) -> list[Path]:
    """The controller files the placed inventory needs: every identity file and known_hosts it names
    (and the default known_hosts, unless the defaults name one)."""
    paths = {local_path(str(ssh[k]), base, home) for ssh in _ssh_mappings(document) for k in SSH_PATHS
             if ssh.get(k)}
    defaults = document.get("defaults") or {}
    if not (defaults.get("ssh") or {}).get("known_hosts"):
        paths.add(local_path(DEFAULT_KNOWN_HOSTS, base, home))
    return sorted(paths)


def placed_path(local: Path, index: int) -> str:
    return posixpath.join(WATCH_DIR, f"ssh-{index}-{local.name}")


def _drop(document: Any, section: str, key: str) -> None:
    if isinstance(document, dict):
        for name, value in document.items():
            if name == section and isinstance(value, dict):
                value.pop(key, None)
            else:
                _drop(value, section, key)


def _escape(value: Any) -> Any:
    """Values are already interpolated: a ``${`` left in one must stay literal when read again."""
    if isinstance(value, str):
        return value.replace("${", "$${")
    if isinstance(value, dict):
        return {k: _escape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_escape(v) for v in value]
    return value


def watch_inventory(document: Mapping[str, Any], base: Path, home: Path, placed: Mapping[Path, str]) -> bytes:
    """The inventory placed for watch: SSH paths rewritten to ``placed`` copies, ``use_ssh_config`` off
    (the controller's ~/.ssh/config is not there), API keys, model uploads, wheelhouses and ``redis:`` left out."""
    doc = copy.deepcopy(dict(document))
    for ssh in _ssh_mappings(doc):
        for key in SSH_PATHS:
            if ssh.get(key):
                ssh[key] = placed[local_path(str(ssh[key]), base, home)]
    defaults = doc.setdefault("defaults", {})
    ssh = defaults.setdefault("ssh", {})
    if not ssh.get("known_hosts"):
        ssh["known_hosts"] = placed[local_path(DEFAULT_KNOWN_HOSTS, base, home)]
    ssh["use_ssh_config"] = False
    for section, key in (("server", "api_keys"), ("model", "upload_from"), ("pip", "wheelhouse")):
        _drop(doc, section, key)
    doc.pop("redis", None)  # watch never uses Redis; its password file stays on the controller
    vip = doc.get("balancer", {}).get("vip")
    if isinstance(vip, dict):
        vip.pop("auth", None)  # the VRRP password: keepalived's, not watch's
    header = "# Placed by `llamactl deploy` for `llamactl watch` (health.watch): do not edit.\n"
    text: str = yaml.safe_dump(_escape(doc), sort_keys=False)
    return (header + text).encode()


def render_watch_unit(inv: Inventory, llamactl_bin: str) -> RenderedFile:
    """The systemd unit that runs ``llamactl watch`` on the placed inventory."""
    source = (importlib.resources.files("llamactl") / "templates" / "llamactl-watch.service.j2").read_text("utf-8")
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    text = env.from_string(source).render(
        cluster=inv.cluster, llamactl_bin=llamactl_bin, inventory_path=WATCH_INVENTORY,
        interval_s=f"{inv.health.interval_s:g}", log_file=WATCH_LOG,
        log_dir_name=posixpath.dirname(WATCH_LOG).removeprefix("/var/log/"),
    )
    return RenderedFile(text.encode(), 0o644)


def watch_files(inv: Inventory, document: Mapping[str, Any], base: Path, home: Path,
                contents: Mapping[Path, bytes], llamactl_bin: str) -> dict[str, RenderedFile]:
    """Every file of the watch service: the SSH files (0600), the inventory (0600) and the unit.
    ``contents``: each of ``ssh_files`` read on the controller."""
    placed = {path: placed_path(path, i) for i, path in enumerate(sorted(contents))}
    files = {placed[path]: RenderedFile(contents[path], 0o600) for path in contents}
    files[WATCH_INVENTORY] = RenderedFile(watch_inventory(document, base, home, placed), 0o600)
    files[WATCH_UNIT_PATH] = render_watch_unit(inv, llamactl_bin)
    return files


def remove_command() -> Command:
    """Uninstall the service when the inventory no longer asks for it (prints ``removed`` if it did)."""
    script = (f"if [ -e {quote(WATCH_UNIT_PATH)} ]; then systemctl disable --now {quote(WATCH_UNIT)}; "
              f"rm -rf {quote(WATCH_UNIT_PATH)} {quote(WATCH_DIR)} && systemctl daemon-reload && echo removed; fi")
    return Command.sh(script, "remove the watch service")


def is_active_command() -> Command:
    """Prints the watch unit's state (``active``, ``inactive``, ``failed`` ...); ``status`` shows it."""
    return Command.of("systemctl", "is-active", WATCH_UNIT)
