"""The resolved cluster: hosts with their instances, the balancer, rollout and health settings.

Built by ``load_inventory`` after merging and checking; everything else in llamactl reads these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from llamactl.inventory.model import (
    HealthSpec,
    ModelSettings,
    PipSettings,
    PrometheusSettings,
    RateLimit,
    RolloutSpec,
    ServerSettings,
    SSHSettings,
    TLSSettings,
)


@dataclass(frozen=True)
class Instance:
    host: str
    index: int
    gpu: int | None
    address: str
    port: int

    @property
    def id(self) -> str:
        return f"{self.host}/{self.index}"

    @property
    def unit(self) -> str:
        return f"llamactl@{self.index}.service"

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}"


@dataclass(frozen=True)
class HostSpec:
    name: str
    address: str
    group: str
    ssh: SSHSettings
    python: str
    install_dir: str
    bind: str
    gpus: list[int]
    base_port: int
    model: ModelSettings
    server: ServerSettings
    pip: PipSettings
    instances: list[Instance] = field(default_factory=list)


@dataclass(frozen=True)
class BalancerHost:
    name: str
    address: str
    ssh: SSHSettings


@dataclass(frozen=True)
class VipSpec:
    """The floating address of ``balancer.vip``, checked against the balancer hosts (``inventory.vip``)."""

    address: str
    prefix: int
    interface: str | None  # None: each host's interface holding its inventory address
    router_id: int
    advert_interval_s: float
    nopreempt: bool
    preempt_delay_s: int
    auth: str | None = field(default=None, repr=False)  # the VRRP password, read from env or a file
    config_path: str = "/etc/keepalived/keepalived.conf"


@dataclass(frozen=True)
class BalancerSpec:
    hosts: list[BalancerHost]
    listen: int
    listen_address: str | None
    server_name: str
    tls: TLSSettings | None
    method: str
    max_fails: int
    fail_timeout_s: int
    keepalive: int
    client_keepalive_s: int
    next_upstream_tries: int
    next_upstream_timeout_s: int
    client_max_body_size_mb: int
    proxy_connect_timeout_s: int
    proxy_read_timeout_s: int
    rate_limit: RateLimit | None
    config_path: str
    prometheus_targets_path: str
    stub_status_port: int | None = None
    vip: VipSpec | None = None


@dataclass(frozen=True)
class RedisSpec:
    host: str  # the inventory name of the host that runs it
    address: str
    port: int
    password: str = field(repr=False)
    maxmemory_mb: int = 256
    appendonly: bool = True
    appendfsync: str = "everysec"
    cache_mb: int = 64  # the cluster-wide result cache's byte budget inside Redis (0: none)
    config_path: str = "/etc/redis/llamactl.conf"
    data_dir: str = "/var/lib/redis-llamactl"

    @property
    def url(self) -> str:
        """What instances connect to (it holds the password: only ever written to 0600 env files)."""
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"redis://:{quote(self.password, safe='')}@{host}:{self.port}/0"


@dataclass(frozen=True)
class Inventory:
    path: Path
    cluster: str
    hosts: list[HostSpec]
    balancer: BalancerSpec
    rollout: RolloutSpec
    health: HealthSpec
    redis: RedisSpec | None = None
    prometheus: PrometheusSettings | None = None  # Prometheus on the balancer hosts

    def instances(self) -> list[Instance]:
        return [inst for host in self.hosts for inst in host.instances]

    def host(self, name: str) -> HostSpec:
        for host in self.hosts:
            if host.name == name:
                return host
        raise KeyError(name)

    @property
    def endpoint(self) -> str:
        """Base URL of the VIP when ``balancer.vip`` is set, else of the first balancer host."""
        lb = self.balancer.hosts[0]
        addr = f"[{lb.address}]" if ":" in lb.address else lb.address
        if self.balancer.vip is not None:
            addr = self.balancer.vip.address
        if self.balancer.tls is not None:
            return f"https://{addr}:{self.balancer.tls.listen}"
        return f"http://{addr}:{self.balancer.listen}"
