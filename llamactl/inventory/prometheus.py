"""The optional ``prometheus:`` section checked against the rest of the cluster: its ports against the
balancer's and the instances' on the same addresses, the scrape timeout against the interval, and the
nginx exporter against stub_status."""

from __future__ import annotations

from typing import TYPE_CHECKING

from llamactl.inventory.cluster import BalancerSpec, HostSpec
from llamactl.inventory.model import Document, PrometheusSettings

if TYPE_CHECKING:
    from llamactl.inventory.load import _Context


def resolve(ctx: _Context, doc: Document | None, hosts: list[HostSpec],
            balancer: BalancerSpec | None) -> PrometheusSettings | None:
    if doc is None or doc.prometheus is None or balancer is None:
        return None
    cfg = doc.prometheus
    if cfg.scrape_timeout_s > cfg.scrape_interval_s:
        ctx.add(("prometheus", "scrape_timeout_s"), f"found {cfg.scrape_timeout_s}, expected at most "
                f"scrape_interval_s ({cfg.scrape_interval_s})", key=False)
    if cfg.nginx_exporter and balancer.stub_status_port is None:
        ctx.add(("prometheus", "nginx_exporter"), "found true with balancer.stub_status_port off, expected "
                "balancer.stub_status_port set (the exporter reads nginx stub_status) or nginx_exporter: false",
                key=False)
    used: list[tuple[int, str]] = [(balancer.listen, "balancer.listen")]
    if balancer.tls is not None:
        used.append((balancer.tls.listen, "balancer.tls.listen"))
    if balancer.stub_status_port is not None:
        used.append((balancer.stub_status_port, "balancer.stub_status_port"))
    lb_addresses = {lb.address for lb in balancer.hosts}
    used += [(i.port, f"instance {i.id}") for h in hosts if h.address in lb_addresses for i in h.instances]
    if doc.redis is not None:
        used.append((doc.redis.port, "redis.port"))  # checked even where Redis runs elsewhere: cheap to avoid
    ports = [("port", cfg.port)] + ([("nginx_exporter_port", cfg.nginx_exporter_port)] if cfg.nginx_exporter else [])
    for key, port in ports:
        for other, what in used:
            if other == port:
                ctx.add(("prometheus", key), f"found port {port}, also used by {what} on the balancer host, "
                        "expected a free port", key=False)
                break
        used.append((port, f"prometheus.{key}"))
    return cfg
