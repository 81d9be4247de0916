"""Checks that span several values: secrets, local files, name/address/port collisions."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamactl.inventory.cluster import BalancerSpec, HostSpec
from llamactl.inventory.merge import Merged
from llamactl.inventory.model import Document, HostConfig, SSHSettings
from llamactl.inventory.yamltree import PathKey, dotted

if TYPE_CHECKING:
    from llamactl.inventory.load import _Context

# Whole words of a variable name, so HF_TOKEN counts but TOKENIZERS_PARALLELISM does not.
_SECRET_WORDS = {"TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "CREDENTIALS", "APIKEY"}
_SECRET_PAIRS = ("API_KEY", "ACCESS_KEY", "PRIVATE_KEY")
_URL_PASSWORD = re.compile(r"://[^/@:]+:[^/@]+@")


def _secret_name(name: str) -> bool:
    upper = name.upper()
    return bool(_SECRET_WORDS & set(upper.split("_"))) or any(pair in upper for pair in _SECRET_PAIRS)


def level_keys(ctx: _Context, data: dict[str, Any], path: PathKey) -> dict[str, Any]:
    """Report keys that belong on a host (or under groups), and return the settings without them."""
    misplaced = {"address"} | ({"hosts"} if path == ("defaults",) else set())
    if "address" in data:
        ctx.add(path + ("address",), f"found an address in {dotted(path)}, expected it on a host "
                "under groups.<group>.hosts.<host>")
    if "hosts" in misplaced and "hosts" in data:
        ctx.add(path + ("hosts",), "found hosts in defaults, expected them under groups.<group>.hosts")
    return {k: v for k, v in data.items() if k not in misplaced}


def inline_secrets(ctx: _Context, layer: dict[str, Any], source: PathKey) -> None:
    """Secrets belong in the controller's environment or a file, never in the inventory text."""
    server = layer.get("server")
    if not isinstance(server, dict):
        return
    keys = server.get("api_keys")
    keys_path = source + ("server", "api_keys")
    if keys is not None and not isinstance(keys, dict):
        ctx.add(keys_path, "found an inline secret, expected {env: VAR} or {file: PATH} (never keys inline)")
        server["api_keys"] = None  # reported; typing it again would echo the secret
    elif isinstance(keys, dict) and "keys" in keys:
        ctx.add(keys_path + ("keys",), "found inline keys, expected {env: VAR} or {file: PATH}")
        del keys["keys"]
    env = server.get("env")
    if isinstance(env, dict):
        for name, value in env.items():
            path = source + ("server", "env", name)
            if not isinstance(value, str) or path in ctx.tree.raw:
                continue
            if _secret_name(name) or _URL_PASSWORD.search(value):
                ctx.add(path,
                        f"found an inline secret, expected ${{{name}}} from the controller's environment",
                        key=False)
    pip = layer.get("pip")
    if isinstance(pip, dict):
        for key in ("index_url", "extra_index_urls"):
            values = pip.get(key)
            for i, value in enumerate(values if isinstance(values, list) else [values]):
                path = source + ("pip", key) + ((i,) if isinstance(values, list) else ())
                if isinstance(value, str) and _URL_PASSWORD.search(value) and path not in ctx.tree.raw:
                    ctx.add(path, "found a password in a URL, expected ${VAR} for it", key=False)


def _local(path: str, base: Path) -> str:
    """Controller-side paths: ~ expanded, relative ones taken from the inventory's directory."""
    expanded = Path(os.path.expanduser(path))
    return str(expanded if expanded.is_absolute() else (base / expanded).resolve())


def ssh_paths(ssh: SSHSettings, base: Path) -> SSHSettings:
    """Resolve the paths the inventory gave; defaults stay as they are (``~`` is the SSH layer's job).

    ``model_fields_set`` is kept as loaded: the SSH layer lets ~/.ssh/config decide what was not given.
    """
    given = set(ssh.model_fields_set)
    update: dict[str, Any] = {
        name: _local(getattr(ssh, name), base)
        for name in ("known_hosts", "identity_file")
        if name in given and getattr(ssh, name) is not None
    }
    copy = ssh.model_copy(update=update)
    object.__setattr__(copy, "__pydantic_fields_set__", given)
    return copy


def resolve_local_paths(
    ctx: _Context, config: HostConfig, merged: Merged, base: Path, env: Mapping[str, str]
) -> HostConfig:
    """Make controller paths absolute and read the API keys (from the environment or a file)."""
    model, pip, server = config.model, config.pip, config.server
    if model.upload_from is not None:
        model = model.model_copy(update={"upload_from": _local(model.upload_from, base)})
    if pip.wheelhouse is not None:
        pip = pip.model_copy(update={"wheelhouse": _local(pip.wheelhouse, base)})
    ref = server.api_keys
    if ref is not None:
        where = merged.source(("server", "api_keys"))
        keys: list[str] = []
        if ref.env is not None and ref.file is not None:
            ctx.add(where, "found both env and file, expected exactly one source of API keys")
        elif ref.env is None and ref.file is None:
            ctx.add(where, "found neither env nor file, expected {env: VAR} or {file: PATH}")
        elif ref.env is not None:
            if ref.env not in env:
                ctx.add(merged.source(("server", "api_keys", "env")),
                        f"found {ref.env}, expected the environment variable {ref.env} to be set "
                        "(it holds the comma-separated API keys)", key=False)
            else:
                keys = [k.strip() for k in env[ref.env].split(",") if k.strip()]
                if not keys:
                    ctx.add(merged.source(("server", "api_keys", "env")),
                            f"found {ref.env} empty, expected at least one key in it", key=False)
        else:
            assert ref.file is not None
            file = _local(ref.file, base)
            fpath = merged.source(("server", "api_keys", "file"))
            try:
                keys = [k.strip() for k in Path(file).read_text().splitlines() if k.strip()]
            except OSError as exc:
                ctx.add(fpath, f"found {file} unreadable ({exc.strerror}), expected a file of keys",
                        key=False)
            else:
                if not keys:
                    ctx.add(fpath, f"found {file} empty, expected one API key per line", key=False)
            ref = ref.model_copy(update={"file": file})
        _check_key_entries(ctx, merged, "env" if ref.env is not None else "file", keys)
        server = server.model_copy(update={"api_keys": ref.model_copy(update={"keys": tuple(keys)})})
    return config.model_copy(update={"ssh": ssh_paths(config.ssh, base), "model": model, "pip": pip,
                                     "server": server})


def cross_check(
    ctx: _Context, hosts: list[HostSpec], balancer: BalancerSpec | None, doc: Document | None
) -> None:
    """Runs on whatever typed cleanly, so collisions show up together with typing problems."""
    if not hosts and not ctx.problems:
        ctx.add(("groups",), "found no hosts, expected at least one host under groups.<group>.hosts")
    names: dict[str, PathKey] = {}
    addresses: dict[str, PathKey] = {}
    for host in hosts:
        hpath: PathKey = ("groups", host.group, "hosts", host.name)
        if host.name in names:
            ctx.add(hpath, f'found host name "{host.name}" again (first at {dotted(names[host.name])}), '
                    "expected unique host names")
        names.setdefault(host.name, hpath)
        if host.address in addresses:
            first = dotted(addresses[host.address])
            ctx.add(hpath, f'found address "{host.address}" again (first at {first}), '
                    "expected one host per address")
        addresses.setdefault(host.address, hpath)
    if balancer is not None:
        _balancer(ctx, hosts, balancer, names)
    if doc is not None and doc.health.timeout_s > doc.health.interval_s:
        ctx.add(("health", "timeout_s"), f"found {doc.health.timeout_s:g}, expected at most interval_s "
                f"({doc.health.interval_s:g})", key=False)


def _balancer(
    ctx: _Context, hosts: list[HostSpec], balancer: BalancerSpec, names: dict[str, PathKey]
) -> None:
    public = {balancer.listen} | ({balancer.tls.listen} if balancer.tls else set())
    if balancer.stub_status_port in public:
        ctx.add(("balancer", "stub_status_port"), f"found {balancer.stub_status_port}, expected a port other "
                "than the balancer's listen ports (stub_status listens on 127.0.0.1 of the same host)", key=False)
    lb_addresses: dict[str, PathKey] = {}
    for lb in balancer.hosts:
        lpath: PathKey = ("balancer", "hosts", lb.name)
        if lb.name in names:
            ctx.add(lpath, f'found host name "{lb.name}" again (first at {dotted(names[lb.name])}), '
                    "expected unique host names")
        if lb.address in lb_addresses:
            first = dotted(lb_addresses[lb.address])
            ctx.add(lpath, f'found address "{lb.address}" again (first at {first}), '
                    "expected one balancer host per address")
        lb_addresses.setdefault(lb.address, lpath)
        listens: list[tuple[int, PathKey]] = [(balancer.listen, ("balancer", "listen"))]
        if balancer.tls is not None:
            listens.append((balancer.tls.listen, ("balancer", "tls", "listen")))
        for host in hosts:  # a balancer may share a machine with servers, but not a port
            if host.address != lb.address:
                continue
            for inst in host.instances:
                for port, where in listens:
                    if inst.port == port:
                        ctx.add(where, f"found port {port} on {lb.address}, also used by instance {inst.id}, "
                                "expected a free port", key=False)
    if balancer.tls is not None and balancer.tls.listen == balancer.listen:
        ctx.add(("balancer", "tls", "listen"), f"found port {balancer.listen} for both HTTP and TLS, "
                "expected two different ports", key=False)


def host_ports(ctx: _Context, config: HostConfig, merged: Merged) -> bool:
    """Instance ports of one host: in range and distinct. Returns False when they are unusable."""
    count = max(1, len(config.gpus))
    if config.ports is None:
        last = config.base_port + count - 1
        if last > 65535:
            ctx.add(merged.source(("base_port",)),
                    f"found {config.base_port} with {count} instances (up to port {last}), "
                    "expected every instance port at most 65535", key=False)
            return False
        return True
    if len(config.ports) != count:
        ctx.add(merged.source(("ports",)),
                f"found {len(config.ports)} ports, expected one per instance ({count})", key=False)
        return False
    first: dict[int, int] = {}
    for i, port in enumerate(config.ports):
        if port in first:
            ctx.add(merged.source(("ports", i)), f"found port {port} again (instance {first[port]} uses it), "
                    "expected one port per instance", key=False)
        first.setdefault(port, i)
    return len(first) == count


def _check_key_entries(ctx: _Context, merged: Merged, source: str, keys: list[str]) -> None:
    """Named keys with limits (``name=... key=... rpm=N tpm=N``): every entry well formed, named once."""
    from llamactl.state.keys import KeySpecError, parse_entries

    try:
        parse_entries(keys, "key")
    except KeySpecError as exc:
        ctx.add(merged.source(("server", "api_keys", source)),
                f"found {exc}; expected each key as KEY or name=NAME key=KEY [rpm=N] [tpm=N]", key=False)
