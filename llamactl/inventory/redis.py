"""The optional ``redis:`` section: where shared state runs, and its password read from env or a file."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamactl.inventory.cluster import BalancerSpec, HostSpec, RedisSpec
from llamactl.inventory.model import Document
from llamactl.inventory.secrets import REF, SecretRule, read_secret

if TYPE_CHECKING:
    from llamactl.inventory.load import _Context

MIN_PASSWORD = 16
# Written unquoted into redis.conf and into a URL (percent-encoded): printable, no spaces, quotes or '\'.
_PASSWORD_RE = re.compile(r"[!#-&(-\[\]-~]+\Z")
_PASSWORD_EXPECTED = (f"a password of at least {MIN_PASSWORD} printable characters without spaces, "
                      "quotes or backslashes")
_REF = REF
_PASSWORD_RULE = SecretRule(("redis", "password"), "password", "Redis password", _PASSWORD_RE,
                            _PASSWORD_EXPECTED, MIN_PASSWORD)


def inline_password(ctx: _Context, data: dict[str, Any]) -> None:
    """Report a password written inline before the section is typed, so no message echoes it."""
    redis = data.get("redis")
    if not isinstance(redis, dict) or "password" not in redis or isinstance(redis["password"], dict):
        return
    ctx.add(("redis", "password"), f"found an inline secret, expected {_REF} (never a password inline)")
    redis["password"] = {}  # typed as a reference to nothing; _inline_reported keeps it one problem


def resolve(
    ctx: _Context, doc: Document | None, hosts: list[HostSpec], balancer: BalancerSpec | None,
    base: Path, env: Mapping[str, str],
) -> RedisSpec | None:
    """The typed section checked against the cluster (host, port) with its password read."""
    if doc is None or doc.redis is None or balancer is None:
        return None
    cfg = doc.redis
    names = {lb.name: lb.address for lb in balancer.hosts} | {h.name: h.address for h in hosts}
    host = cfg.host if cfg.host is not None else (balancer.hosts[0].name if balancer.hosts else None)
    if host is None:
        return None  # no balancer host: reported already
    if host not in names:
        known = ", ".join(names)
        ctx.add(("redis", "host"), f'found "{host}", expected the name of a balancer or server host '
                f"({known})", key=False)
        return None
    address = names[host]
    _port_free(ctx, cfg.port, address, hosts, balancer)
    password = _password(ctx, cfg.password.env, cfg.password.file, base, env)
    cache_mb = cfg.maxmemory_mb // 4 if cfg.cache_mb is None else cfg.cache_mb
    if cache_mb >= cfg.maxmemory_mb:
        ctx.add(("redis", "cache_mb"), f"found {cache_mb}, expected less than maxmemory_mb ({cfg.maxmemory_mb}): "
                "the jobs need the rest", key=False)
        return None
    if password is None:
        return None
    return RedisSpec(host=host, address=address, port=cfg.port, password=password,
                     maxmemory_mb=cfg.maxmemory_mb, cache_mb=cache_mb, appendonly=cfg.appendonly, appendfsync=cfg.appendfsync,
                     config_path=cfg.config_path, data_dir=cfg.data_dir)


def _port_free(ctx: _Context, port: int, address: str, hosts: list[HostSpec], balancer: BalancerSpec) -> None:
    used: list[tuple[int, str]] = [(i.port, f"instance {i.id}") for h in hosts if h.address == address
                                   for i in h.instances]
    if any(lb.address == address for lb in balancer.hosts):
        used.append((balancer.listen, "balancer.listen"))
        if balancer.tls is not None:
            used.append((balancer.tls.listen, "balancer.tls.listen"))
    for other, what in used:
        if other == port:
            ctx.add(("redis", "port"), f"found port {port} on {address}, also used by {what}, "
                    "expected a free port", key=False)
            return


def _password(ctx: _Context, var: str | None, file: str | None, base: Path,
              env: Mapping[str, str]) -> str | None:
    return read_secret(ctx, _PASSWORD_RULE, var, file, base, env, report_neither=not _inline_reported(ctx))


def _inline_reported(ctx: _Context) -> bool:
    return any(p.path == "redis.password" and "inline secret" in p.message for p in ctx.problems)
