"""``load_inventory``: YAML with positions -> merged, typed, cross-checked ``Inventory``.

Every problem is collected (not just the first) and raised together as one ``InventoryError``.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from llamactl.errors import InventoryError, Problem, UsageError
from llamactl.inventory import checks, prometheus, redis, vip
from llamactl.inventory.cluster import BalancerHost, BalancerSpec, HostSpec, Instance, Inventory
from llamactl.inventory.merge import Merged, position
from llamactl.inventory.model import (
    NAME_EXPECTED,
    NAME_RE,
    BalancerConfig,
    Document,
    HostConfig,
    SSHSettings,
)
from llamactl.inventory.problems import Loc, describe, from_validation
from llamactl.inventory.yamltree import PathKey, Tree, dotted, parse_yaml


class _Context:
    def __init__(self, file: str, tree: Tree) -> None:
        self.file = file
        self.tree = tree
        self.problems: list[Problem] = []

    def add(self, path: PathKey, message: str, *, key: bool = True) -> None:
        shown, line, col, _ = position(self.tree, path, key)
        self.problems.append(Problem(self.file, line, col, shown, message))

    def typed(self, model: type[BaseModel], data: Any, merged: Merged | None, prefix: PathKey = (),
              *, partial: bool = False) -> Any:
        """Validate ``data`` as ``model``; map errors back through ``merged`` origins (or ``prefix``).

        ``partial``: ``data`` is one level of a merge (defaults or a group), checked as written; what it
        leaves out (a host's address, the model source) is no error there."""
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            def locate(loc: Loc, key: bool) -> tuple[str, int, int, str | None]:
                path = merged.source(loc) if merged is not None else prefix + loc
                return position(self.tree, path, key)

            broken = {dotted(p) for p in self.tree.broken}
            ignore = frozenset({"missing"}) if partial else frozenset()
            found = from_validation(exc, model, locate, self.file, ignore=ignore)
            self.problems.extend(p for p in found if p.path not in broken)
            return None

    def level(self, data: dict[str, Any], path: PathKey) -> None:
        """Check one level of host settings as written, so a bad value a later level overrides is still
        reported at its own line (secrets are masked first, so no message echoes one)."""
        checks.inline_secrets(self, data, path)
        self.typed(HostConfig, data, None, path, partial=True)


def load_inventory(path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None) -> Inventory:
    """Load and check an inventory file. Raises ``InventoryError`` listing every problem."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{file}: no such inventory file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{file}: cannot read the inventory: {exc}") from None
    environ = os.environ if env is None else env
    tree, problems = parse_yaml(text, str(file), environ)
    if problems and tree.data is None:
        raise InventoryError(problems)
    ctx = _Context(str(file), tree)
    ctx.problems.extend(problems)
    data = tree.data
    if not isinstance(data, dict):
        ctx.add((), f"found {describe(data)}, expected a mapping with cluster, groups and balancer")
        raise InventoryError(ctx.problems)
    redis.inline_password(ctx, data)
    vip.inline_auth(ctx, data)
    doc = ctx.typed(Document, data, None)
    hosts = _hosts(ctx, data, file.parent, environ)
    balancer = _balancer(ctx, data, doc, file.parent)
    checks.cross_check(ctx, hosts, balancer, doc)
    balancer = vip.resolve(ctx, doc, hosts, balancer, file.parent, environ)
    redis_spec = redis.resolve(ctx, doc, hosts, balancer, file.parent, environ)
    prometheus_cfg = prometheus.resolve(ctx, doc, hosts, balancer)
    if ctx.problems:
        raise InventoryError(_sorted_unique(ctx.problems))
    assert doc is not None and balancer is not None
    return Inventory(file, doc.cluster, hosts, balancer, doc.rollout, doc.health, redis_spec,
                     prometheus=prometheus_cfg)


def _sorted_unique(problems: list[Problem]) -> list[Problem]:
    unique = {str(p): p for p in problems}  # a bad default is reported once, not once per host
    return sorted(unique.values(), key=lambda p: (p.line, p.column, p.path, p.message))


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _hosts(ctx: _Context, data: dict[str, Any], base: Path, env: Mapping[str, str]) -> list[HostSpec]:
    defaults = checks.level_keys(ctx, _mapping(data.get("defaults")), ("defaults",))
    ctx.level(defaults, ("defaults",))
    hosts: list[HostSpec] = []
    for group, gdata in _mapping(data.get("groups")).items():
        gpath: PathKey = ("groups", group)
        if not NAME_RE.match(group):
            ctx.add(gpath, f'found group name "{group}", expected {NAME_EXPECTED}')
        if not isinstance(gdata, dict):
            continue  # Document validation reported it
        if not isinstance(gdata.get("hosts"), dict):
            if "hosts" not in gdata:
                close = difflib.get_close_matches("hosts", [str(k) for k in gdata], n=1, cutoff=0.6)
                hint = f' (did you mean "hosts" instead of "{close[0]}"?)' if close else ""
                ctx.add(gpath, f'found no "hosts", expected a mapping of host names to host settings{hint}')
            else:
                ctx.add(gpath + ("hosts",), f"found {describe(gdata['hosts'])}, "
                        "expected a mapping of host names to host settings", key=False)
            continue
        settings = checks.level_keys(ctx, {k: v for k, v in gdata.items() if k not in ("hosts", "vip")}, gpath)
        ctx.level(settings, gpath)
        for name, hdata in gdata["hosts"].items():
            hpath = gpath + ("hosts", name)
            if not NAME_RE.match(name):
                ctx.add(hpath, f'found host name "{name}", expected {NAME_EXPECTED}')
            if hdata is not None and not isinstance(hdata, dict):
                ctx.add(hpath, f"found {describe(hdata)}, expected a mapping with at least an address",
                        key=False)
                continue
            merged = Merged(hpath)
            checks.inline_secrets(ctx, hdata or {}, hpath)  # defaults and group: done in ctx.level
            for layer, source in ((defaults, ("defaults",)), (settings, gpath), (hdata or {}, hpath)):
                merged.layer(layer, source)
            config = ctx.typed(HostConfig, merged.data, merged)
            if config is None or not checks.host_ports(ctx, config, merged):
                continue
            config = checks.resolve_local_paths(ctx, config, merged, base, env)
            hosts.append(_host_spec(name, group, config))
    return hosts


def _host_spec(name: str, group: str, config: HostConfig) -> HostSpec:
    count = max(1, len(config.gpus))
    ports = config.ports if config.ports is not None else [config.base_port + i for i in range(count)]
    instances = [
        Instance(name, i, config.gpus[i] if config.gpus else None, config.address, ports[i])
        for i in range(count)
    ]
    return HostSpec(
        name=name, address=config.address, group=group, ssh=config.ssh, python=config.python,
        install_dir=config.install_dir.rstrip("/") or "/", bind=config.bind, gpus=list(config.gpus),
        base_port=config.base_port, model=config.model, server=config.server, pip=config.pip,
        instances=instances,
    )


def _balancer(ctx: _Context, data: dict[str, Any], doc: Document | None, base: Path) -> BalancerSpec | None:
    raw = _mapping(data.get("balancer"))
    defaults_ssh = _mapping(_mapping(data.get("defaults")).get("ssh"))
    lb_hosts: list[BalancerHost] = []
    for name, hdata in _mapping(raw.get("hosts")).items():
        hpath: PathKey = ("balancer", "hosts", name)
        if not NAME_RE.match(name):
            ctx.add(hpath, f'found host name "{name}", expected {NAME_EXPECTED}')
        if not isinstance(hdata, dict):
            continue
        merged = Merged(hpath + ("ssh",))
        merged.layer(defaults_ssh, ("defaults", "ssh"))
        merged.layer(_mapping(hdata.get("ssh")), hpath + ("ssh",))
        ssh = ctx.typed(SSHSettings, merged.data, merged)
        address = hdata.get("address")
        if ssh is not None and isinstance(address, str):
            lb_hosts.append(BalancerHost(name, address, checks.ssh_paths(ssh, base)))
    if isinstance(raw.get("hosts"), dict) and not raw["hosts"]:
        ctx.add(("balancer", "hosts"), "found no hosts, expected at least one balancer host")
    if doc is None:
        return None
    cfg: BalancerConfig = doc.balancer
    fields = {k: getattr(cfg, k) for k in BalancerConfig.model_fields if k not in ("hosts", "vip")}
    if fields["next_upstream_timeout_s"] is None:
        fields["next_upstream_timeout_s"] = cfg.proxy_read_timeout_s
    return BalancerSpec(hosts=lb_hosts, **fields)

