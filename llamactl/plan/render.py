"""Render every file llamactl places on hosts (pure: no sockets, no subprocess, no clock).

Templates live in ``llamactl/templates`` (the top-level ``templates/`` shipped inside the wheel) and are
loaded through importlib.resources, so an installed wheel renders exactly what a checkout does.
"""

from __future__ import annotations

import importlib.resources
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import jinja2

from llamactl.inventory.cluster import HostSpec, Inventory
from llamactl.inventory.envfile import expected_env

UNIT_PATH = "/etc/systemd/system/llamactl@.service"
ENV_DIR = "/etc/llamactl"
STOP_MARGIN_S = 30  # systemd waits this much beyond the longest drain before SIGKILL


@dataclass(frozen=True)
class RenderedFile:
    content: bytes
    mode: int


def env_path(index: int) -> str:
    return f"{ENV_DIR}/instance-{index}.env"


_PLAIN = re.compile(r"[A-Za-z0-9_./:,@%+=-]*\Z")


def envquote(value: str) -> str:
    """Quote for systemd's EnvironmentFile= parser: plain words as-is, others in escaped double quotes."""
    if _PLAIN.match(value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$").replace("`", "\\`")
    return f'"{escaped}"'


def _load(name: str) -> str:
    return (importlib.resources.files("llamactl") / "templates" / name).read_text(encoding="utf-8")


_ENV = jinja2.Environment(
    loader=jinja2.FunctionLoader(_load),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
    autoescape=False,
)
_ENV.filters["envquote"] = envquote


def _render(template: str, **context: Any) -> bytes:
    return _ENV.get_template(template).render(**context).encode()


def stop_timeout_s(inv: Inventory, host: HostSpec) -> int:
    """Longer than both drain timeouts, so systemd never kills a draining server early."""
    longest = max(host.server.drain_timeout_s, inv.rollout.drain_timeout_s)
    return int(math.ceil(longest)) + STOP_MARGIN_S


def render_host_files(inv: Inventory, host: HostSpec) -> dict[str, RenderedFile]:
    """The template unit and one env file (0600: it may hold API keys) per instance of ``host``."""
    files = {
        UNIT_PATH: RenderedFile(
            _render("llamactl@.service.j2", host=host, cluster=inv.cluster,
                    stop_timeout_s=stop_timeout_s(inv, host)),
            0o644,
        )
    }
    for inst in host.instances:
        env = expected_env(inv, inst)
        files[env_path(inst.index)] = RenderedFile(_render("instance.env.j2", instance=inst, env=env), 0o600)
    return files


def _hostport(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def render_balancer_files(inv: Inventory, drained: Iterable[str] = frozenset()) -> dict[str, RenderedFile]:
    """The nginx config (inside ``http {}``), the Prometheus file_sd targets and, with ``health.alerts``
    enabled, the Prometheus rules (``llamactl.plan.alerts``) and a Grafana dashboard (``plan.dashboard``).

    Instances whose id is in ``drained`` are marked ``down``. When every instance is drained, nginx
    answers 503 with Retry-After itself (a config of only ``down`` servers loads but yields bare 502s).
    """
    drained = frozenset(drained)
    lb = inv.balancer
    instances = [
        {"id": i.id, "target": _hostport(i.address, i.port), "drained": i.id in drained}
        for i in inv.instances()
    ]
    listen_host = f"{lb.listen_address}:" if lb.listen_address else ""
    if lb.listen_address and ":" in lb.listen_address:
        listen_host = f"[{lb.listen_address}]:"
    tls_port = lb.tls.listen if lb.tls else 443
    nginx = _render(
        "nginx.conf.j2",
        cluster=inv.cluster,
        lb=lb,
        upstream="llamactl_" + re.sub(r"[^A-Za-z0-9_]", "_", inv.cluster),
        instances=instances,
        all_drained=all(i["drained"] for i in instances),
        listen=f"{listen_host}{lb.listen}",
        tls_listen=f"{listen_host}{tls_port}",
        tls_port_suffix="" if tls_port == 443 else f":{tls_port}",
        job_routes=job_routes(inv),
    )
    files = {
        lb.config_path: RenderedFile(nginx, 0o644),
        lb.prometheus_targets_path: RenderedFile(prometheus_targets(inv), 0o644),
    }
    if inv.health.alerts.enabled:
        from llamactl.plan.alerts import rules_file
        from llamactl.plan.dashboard import dashboard

        files[inv.health.alerts.rules_path] = RenderedFile(rules_file(inv), 0o644)
        files[inv.health.alerts.dashboard_path] = RenderedFile(dashboard(inv), 0o644)
    return files


def job_routes(inv: Inventory) -> list[dict[str, str]]:
    """Without Redis, each instance's job-id tag and address, so nginx routes GET /v1/jobs/{id} to the
    instance holding the job (``llamactl.server.jobs.route_tag``). With Redis any instance answers: none."""
    from llamactl.server.jobs import route_tag

    if inv.redis is not None:
        return []
    return [{"id": i.id, "tag": route_tag(i.id), "target": _hostport(i.address, i.port)} for i in inv.instances()]


def prometheus_targets(inv: Inventory) -> bytes:
    """file_sd JSON: one target group per instance, so each carries its own labels."""
    groups = [
        {
            "targets": [_hostport(i.address, i.port)],
            "labels": {
                "cluster": inv.cluster,
                "host": i.host,
                "instance": i.id,
                "gpu": "cpu" if i.gpu is None else str(i.gpu),
            },
        }
        for i in inv.instances()
    ]
    return (json.dumps(groups, indent=2) + "\n").encode()


def render_redis_files(inv: Inventory) -> dict[str, RenderedFile]:
    """The Redis config for the ``redis:`` host (0600: it holds the password); empty without the section."""
    if inv.redis is None:
        return {}
    binds = " ".join(dict.fromkeys([inv.redis.address, "127.0.0.1"]))  # its inventory address and loopback
    conf = _render("redis.conf.j2", cluster=inv.cluster, redis=inv.redis, binds=binds)
    return {inv.redis.config_path: RenderedFile(conf, 0o600)}


def render_all(inv: Inventory) -> dict[str, dict[str, RenderedFile]]:
    """Every file for every host: server hosts, then balancer hosts (each gets the same balancer files, and
    with ``prometheus:`` its Prometheus config and units), and the Redis config on the ``redis:`` host."""
    out = {host.name: render_host_files(inv, host) for host in inv.hosts}
    balancer = render_balancer_files(inv)
    for lb in inv.balancer.hosts:
        out[lb.name] = dict(balancer)
    if inv.redis is not None:
        out.setdefault(inv.redis.host, {}).update(render_redis_files(inv))
    if inv.prometheus is not None:  # Prometheus on each balancer host (``llamactl.plan.prometheus``)
        from llamactl.plan import prometheus

        rules = balancer.get(inv.health.alerts.rules_path) if inv.health.alerts.enabled else None
        for lb in inv.balancer.hosts:
            out[lb.name].update(prometheus.files(inv, lb.name, rules.content if rules else None))
    return out
