"""The typed inventory: pydantic models for each settings block, dataclasses for the resolved cluster.

Models are strict (YAML already has types: ``port: "22"`` is a mistake worth reporting) and forbid
unknown keys, so misspellings surface with a "did you mean".
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Port = Annotated[int, Field(ge=1, le=65535)]
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z")  # also a directory name in `render --out`
NAME_EXPECTED = 'letters, digits, ".", "_" or "-" (at most 63, starting with a letter or digit)'
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
MAX_GPUS = 64


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


# Paths end up in unit files and nginx configs: no whitespace, quotes, ';', braces or systemd's '%'.
_SAFE_PATH = re.compile(r"/[A-Za-z0-9._/@+=,~-]*\Z")
_SERVER_NAMES = re.compile(r"[A-Za-z0-9*._~:-]+( [A-Za-z0-9*._~:-]+)*\Z")


def _absolute(value: str) -> str:
    if not _SAFE_PATH.match(value):
        raise ValueError("an absolute path of letters, digits and ._/@+=,~- (no spaces)")
    return value


def _check_address(value: str) -> str:
    if not re.match(r"[A-Za-z0-9_][A-Za-z0-9_.:-]*\Z", value) or len(value) > 253:
        raise ValueError("a host name or an IP address")
    return value


class SSHSettings(_Model):
    user: str | None = None  # None: ~/.ssh/config or the local user name decides
    port: Port = 22
    identity_file: str | None = None
    jump: str | None = None  # ProxyJump, [user@]host[:port]
    known_hosts: str = "~/.ssh/known_hosts"
    host_key_policy: Literal["strict", "accept-new"] = "strict"
    connect_timeout_s: Annotated[float, Field(gt=0, le=600)] = 10.0
    use_ssh_config: bool = True
    become: bool = False  # non-root user: run commands and write files through passwordless `sudo -n`


class GenerationSettings(_Model):
    max_new_tokens: Annotated[int, Field(ge=1, le=131072)] = 1024
    temperature: Annotated[float, Field(ge=0, le=5)] = 0.6
    top_p: Annotated[float, Field(gt=0, le=1)] = 0.9
    do_sample: bool = False


class ModelSettings(_Model):
    source: str = Field(description="a model path on the host or a hub id like Xkev/Llama-3.2V-11B-cot")
    upload_from: str | None = None  # a local directory copied to `source`
    revision: str = "main"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "bfloat16"
    quantization: Literal["none", "nf4", "int8", "fp8"] = "none"
    generation: GenerationSettings = GenerationSettings()


class ApiKeysRef(_Model):
    """Where the API keys come from. ``keys`` is filled by the loader, never from YAML."""

    env: str | None = None
    file: str | None = None
    keys: tuple[str, ...] = Field(default=(), repr=False, exclude=True)

    @field_validator("env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not ENV_NAME_RE.match(value):
            raise ValueError("an environment variable name like LLAMACTL_API_KEYS")
        return value


class CacheSettings(_Model):
    max_entries: Annotated[int, Field(ge=0)] = 1024
    max_mb: Annotated[int, Field(ge=0)] = 256
    include_sampled: bool = False


class ServerSettings(_Model):
    user: str = "llamactl"  # the unit's User=; "root" runs as root (test labs)
    max_batch_size: Annotated[int, Field(ge=1, le=256)] = 8
    max_wait_ms: Annotated[int, Field(ge=0, le=10000)] = 10
    queue_limit: Annotated[int, Field(ge=0)] = 64
    request_timeout_s: Annotated[float, Field(gt=0)] = 600.0
    drain_timeout_s: Annotated[float, Field(ge=0)] = 60.0
    engine: Literal["auto", "continuous", "hf"] = "auto"  # auto: continuous-batching, hf where it cannot run
    stall_timeout_s: float = 60.0  # busy with no engine step for this long: the server reports "stalled"
    max_body_mb: Annotated[int, Field(ge=1)] = 20
    max_image_pixels: Annotated[int, Field(ge=1)] = 40_000_000
    max_image_mb: Annotated[int, Field(ge=1)] = 15
    api_keys: ApiKeysRef | None = None
    cache: CacheSettings = CacheSettings()
    # Per instance: "auto" = its share of the host's physical cores (cores / instances on the host).
    cpu_threads: int | Literal["auto"] = "auto"
    cpu_pinning: bool = False  # pin each instance to its own run of whole cores
    env: dict[str, str] = {}

    @field_validator("user")
    @classmethod
    def _user(cls, value: str) -> str:
        if not re.match(r"[a-z_][a-z0-9_-]{0,31}\Z", value):
            raise ValueError("a user name like llamactl or root")
        return value

    @field_validator("cpu_threads", mode="before")
    @classmethod
    def _cpu_threads(cls, value: object) -> int | str:
        if value == "auto" or (type(value) is int and 1 <= value <= 4096):
            return value
        raise ValueError('"auto" or a number of threads from 1 to 4096')

    @field_validator("stall_timeout_s", mode="before")
    @classmethod
    def _stall_timeout(cls, value: object) -> float:
        # By hand: the server refuses inf and nan too, and a rendered value it refuses would fail at start.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("a number of seconds greater than 0")
        if not math.isfinite(value) or value <= 0:
            raise ValueError("a number of seconds greater than 0")
        return float(value)

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name, item in value.items():
            if not ENV_NAME_RE.match(name):
                raise ValueError(f'environment variable names like HF_HUB_OFFLINE, not "{name}"')
            if name.startswith("LLAMACTL_") or name == "CUDA_VISIBLE_DEVICES":
                raise ValueError(f"extra variables only; {name} is set from the inventory's own settings")
            if any(ord(c) < 32 for c in item):
                raise ValueError(f"single-line values (no control characters in {name})")
        return value


# llamactl's optional extras a server host may install beside ``server`` (pyproject.toml)
SERVER_EXTRAS = ("flash4",)


class PipSettings(_Model):
    index_url: str | None = None
    extra_index_urls: list[str] = []
    find_links: list[str] = []
    no_index: bool = False
    wheelhouse: str | None = None  # a local directory of wheels uploaded to air-gapped hosts
    extras: list[str] = []  # more of llamactl's extras for the release venv (flash4: FlashAttention 4's kernels)

    @field_validator("extras")
    @classmethod
    def _extras(cls, value: list[str]) -> list[str]:
        unknown = [name for name in value if name not in SERVER_EXTRAS]
        if unknown:
            raise ValueError(f"a list of llamactl's optional extras ({', '.join(SERVER_EXTRAS)}); not "
                             f"{', '.join(unknown)}")
        return sorted(set(value))


class HostConfig(_Model):
    """One server host after defaults -> group -> host merging (the YAML shape)."""

    address: str = Field(description="the host's address (a DNS name or an IP address)")
    ssh: SSHSettings = SSHSettings()
    python: str = "/usr/bin/python3"
    install_dir: str = "/opt/llamactl"
    gpus: Any = Field(default=1, validate_default=True)  # a count or a list of indices: see _gpus
    base_port: Port = 8000
    ports: list[Port] | None = None  # explicit per-instance ports (overrides base_port + i)
    bind: str = "0.0.0.0"
    model: ModelSettings
    server: ServerSettings = ServerSettings()
    pip: PipSettings = PipSettings()

    @field_validator("address", "bind")
    @classmethod
    def _address(cls, value: str) -> str:
        return _check_address(value)

    @field_validator("install_dir", "python")
    @classmethod
    def _abs(cls, value: str) -> str:
        return _absolute(value)

    @field_validator("gpus", mode="before")
    @classmethod
    def _gpus(cls, value: Any) -> Any:
        expected = f"a GPU count from 0 to {MAX_GPUS} or a list of distinct GPU indices"
        if isinstance(value, bool):
            raise ValueError(expected)
        if isinstance(value, int):
            if not 0 <= value <= MAX_GPUS:
                raise ValueError(expected)
            return list(range(value))
        if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            if len(set(value)) != len(value) or any(not 0 <= v < 1024 for v in value):
                raise ValueError(expected)
            return list(value)
        raise ValueError(expected)


class TLSSettings(_Model):
    listen: Port = 443
    certificate: str = Field(description="the certificate's path on the balancer host")
    certificate_key: str = Field(description="the private key's path on the balancer host")
    redirect_http: bool = True  # plain-HTTP listener answers 301 to https (False: serve both)

    @field_validator("certificate", "certificate_key")
    @classmethod
    def _abs(cls, value: str) -> str:
        return _absolute(value)


class RateLimit(_Model):
    requests_per_second: Annotated[int, Field(ge=1, description="requests per second per client address")]
    burst: Annotated[int, Field(ge=0)] = 0


class BalancerHostConfig(_Model):
    address: str = Field(description="the balancer host's address (a DNS name or an IP address)")

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        return _check_address(value)
    ssh: dict[str, Any] = {}  # merged over defaults.ssh, then typed as SSHSettings


class SecretRef(_Model):
    """A secret named by reference: an environment variable or a file on the controller (``inventory.secrets``)."""

    env: str | None = None
    file: str | None = None

    @field_validator("env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not ENV_NAME_RE.match(value):
            raise ValueError("an environment variable name like LLAMACTL_PASSWORD")
        return value


class VipSettings(_Model):
    """One floating address moved between the balancer hosts by keepalived (VRRP); see ``inventory.vip``."""

    address: str = Field(description="the floating IPv4 address clients use, like 10.0.0.100")
    prefix: Annotated[int, Field(ge=1, le=32)] = 24
    interface: str | None = None  # None: on each host, the interface holding its inventory address
    router_id: Annotated[int, Field(ge=1, le=255)] = Field(description="the VRRP virtual router id, 1 to 255")
    advert_interval_s: Annotated[float, Field(gt=0, le=40)] = 0.25
    nopreempt: bool = True  # a recovered host never takes the address back
    preempt_delay_s: Annotated[int, Field(ge=0, le=1000)] = 0  # with nopreempt: false
    auth: SecretRef | None = None  # VRRPv2 PASS authentication: whole-second adverts only
    config_path: str = "/etc/keepalived/keepalived.conf"

    @field_validator("address")
    @classmethod
    def _ipv4(cls, value: str) -> str:
        if not re.match(r"(\d{1,3}\.){3}\d{1,3}\Z", value) or any(int(p) > 255 for p in value.split(".")):
            raise ValueError("an IPv4 address like 10.0.0.100")
        return value

    @field_validator("interface")
    @classmethod
    def _interface(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"[A-Za-z0-9_.@-]{1,15}\Z", value):
            raise ValueError("an interface name like eth0 (at most 15 letters, digits, '.', '_', '@' or '-')")
        return value

    @field_validator("config_path")
    @classmethod
    def _abs(cls, value: str) -> str:
        return _absolute(value)


class BalancerConfig(_Model):
    hosts: dict[str, BalancerHostConfig]
    listen: Port = 80
    listen_address: str | None = None
    server_name: str = "_"
    tls: TLSSettings | None = None
    method: Literal["least_conn", "round_robin", "ip_hash"] = "least_conn"
    max_fails: Annotated[int, Field(ge=0)] = 2
    fail_timeout_s: Annotated[int, Field(ge=1)] = 10
    keepalive: Annotated[int, Field(ge=0)] = 32
    # Idle keep-alive of client connections. 0 (a new connection per request) because on every reload the old
    # workers close their idle client connections, and a client that reuses one at that instant gets a reset
    # that nginx cannot retry for it (bench/reload_race.py measures it).
    client_keepalive_s: Annotated[int, Field(ge=0, le=3600)] = 0
    next_upstream_tries: Annotated[int, Field(ge=1, le=100)] = 3
    next_upstream_timeout_s: Annotated[int, Field(ge=0)] | None = None  # None: proxy_read_timeout_s
    client_max_body_size_mb: Annotated[int, Field(ge=1)] = 25
    proxy_connect_timeout_s: Annotated[int, Field(ge=1)] = 5
    proxy_read_timeout_s: Annotated[int, Field(ge=1)] = 900
    rate_limit: RateLimit | None = None
    config_path: str = "/etc/nginx/conf.d/llamactl.conf"
    prometheus_targets_path: str = "/etc/prometheus/file_sd/llamactl.json"
    # nginx stub_status on 127.0.0.1 of each balancer host (None: off); `status` reads it over SSH.
    stub_status_port: Port | None = 8089
    vip: VipSettings | None = None  # one floating address for two or more balancer hosts (keepalived)

    @field_validator("config_path", "prometheus_targets_path")
    @classmethod
    def _abs(cls, value: str) -> str:
        return _absolute(value)

    @field_validator("server_name")
    @classmethod
    def _server_name(cls, value: str) -> str:
        if not _SERVER_NAMES.match(value):
            raise ValueError('host names separated by spaces, like "vision.example.com" or "_"')
        return value

    @field_validator("listen_address")
    @classmethod
    def _listen_address(cls, value: str | None) -> str | None:
        return None if value is None else _check_address(value)


class RolloutSpec(_Model):
    batch: int | str = 1  # a count or a percentage such as "25%"
    max_unavailable: Annotated[int, Field(ge=1)] = 1
    drain_timeout_s: Annotated[float, Field(ge=0)] = 60.0
    ready_timeout_s: Annotated[float, Field(gt=0)] = 900.0
    canary: bool = True

    @field_validator("batch", mode="before")
    @classmethod
    def _batch(cls, value: Any) -> Any:
        expected = 'a count of at least 1 or a percentage from 1% to 100% like "25%"'
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
        if isinstance(value, str) and re.match(r"\d{1,3}%\Z", value) and 1 <= int(value[:-1]) <= 100:
            return value
        raise ValueError(expected)

    def batch_size(self, total: int) -> int:
        """Instances per batch for a cluster of ``total`` instances (at least 1)."""
        if isinstance(self.batch, int):
            return max(1, min(self.batch, total))
        return max(1, total * int(self.batch[:-1]) // 100)


class AlertSpec(_Model):
    """Prometheus alert and recording rules for the cluster (``llamactl.plan.alerts``), placed with the
    file_sd targets on the balancer hosts when ``enabled``."""

    enabled: bool = False
    rules_path: str = "/etc/prometheus/rules/llamactl.yml"
    dashboard_path: str = "/etc/llamactl/grafana/llamactl-dashboard.json"  # Grafana JSON, placed with the rules
    not_ready_for_s: Annotated[int, Field(ge=60)] = 600
    p95_latency_slo_s: Annotated[float, Field(gt=0)] = 120.0  # end to end, a whole chain-of-thought answer
    ttft_p95_slo_s: Annotated[float, Field(gt=0)] = 5.0
    error_ratio: Annotated[float, Field(gt=0, le=1)] = 0.05  # 5xx answers / all answers
    rate_429_ratio: Annotated[float, Field(gt=0, le=1)] = 0.05
    queue_saturation_ratio: Annotated[float, Field(gt=0, le=1)] = 0.9  # waiting / queue_limit
    gpu_memory_ratio: Annotated[float, Field(gt=0, le=1)] = 0.98  # the engine's pools fill the rest on purpose
    drift_for_s: Annotated[int, Field(ge=60)] = 1800  # longer than a rolling restart of the cluster

    @field_validator("rules_path", "dashboard_path")
    @classmethod
    def _abs(cls, value: str) -> str:
        return _absolute(value)


class HealthSpec(_Model):
    interval_s: Annotated[float, Field(gt=0)] = 5.0
    timeout_s: Annotated[float, Field(gt=0)] = 3.0
    fall: Annotated[int, Field(ge=1)] = 3
    rise: Annotated[int, Field(ge=1)] = 2
    startup_grace_s: Annotated[float, Field(ge=0)] = 600.0
    watch: bool = False  # deploy installs `llamactl watch` on the first balancer host as a systemd unit
    alerts: AlertSpec = AlertSpec()


class RedisSettings(_Model):
    """Shared cluster state (async jobs). The password is read by the loader into ``RedisSpec``."""

    host: str | None = None  # a balancer or server host name; None: the first balancer host
    port: Port = 6379
    password: SecretRef = Field(description="{env: VAR} or {file: PATH} holding the Redis password")
    maxmemory_mb: Annotated[int, Field(ge=1, le=1_048_576)] = 256
    appendonly: bool = True  # jobs survive a Redis restart only with the append-only file
    appendfsync: Literal["always", "everysec", "no"] = "everysec"
    # the cluster-wide result cache's share of Redis (MiB; 0 = no shared cache); default: a quarter of maxmemory
    cache_mb: Annotated[int, Field(ge=0, le=1_048_576)] | None = None
    config_path: str = "/etc/redis/llamactl.conf"
    data_dir: str = "/var/lib/redis-llamactl"

    @field_validator("config_path", "data_dir")
    @classmethod
    def _abs(cls, value: str) -> str:
        return _absolute(value)


_PROM_DURATION = re.compile(r"([0-9]+(ms|s|m|h|d|w|y))+\Z")
_PROM_SIZE = re.compile(r"[0-9]+(B|KB|MB|GB|TB|PB|EB)\Z")


class PrometheusSettings(_Model):
    """Prometheus on every balancer host (``llamactl.plan.prometheus``): deploy installs the distribution's
    ``prometheus`` package when missing and runs it as ``llamactl-prometheus.service``, scraping every
    instance (the file_sd targets) and the balancer's nginx (stub_status through prometheus-nginx-exporter),
    with the alert and recording rules of ``health.alerts`` loaded."""

    port: Port = 9090
    listen_address: str | None = None  # None: every address of the balancer host
    scrape_interval_s: Annotated[int, Field(ge=1, le=3600)] = 15
    scrape_timeout_s: Annotated[int, Field(ge=1, le=3600)] = 10
    evaluation_interval_s: Annotated[int, Field(ge=1, le=3600)] = 15
    retention_time: str = "15d"
    retention_size: str | None = None  # e.g. "10GB": the oldest blocks go first past it
    data_dir: str = "/var/lib/llamactl-prometheus"
    config_path: str = "/etc/llamactl/prometheus/prometheus.yml"
    binary: str = "/usr/bin/prometheus"
    install: bool = True  # apt-get install the package when missing (false: preflight names the command)
    nginx_exporter: bool = True  # the balancer's figures through prometheus-nginx-exporter on loopback
    nginx_exporter_port: Port = 9113

    @field_validator("data_dir", "config_path", "binary")
    @classmethod
    def _abs(cls, value: str) -> str:
        return _absolute(value)

    @field_validator("listen_address")
    @classmethod
    def _listen_address(cls, value: str | None) -> str | None:
        return None if value is None else _check_address(value)

    @field_validator("retention_time")
    @classmethod
    def _retention_time(cls, value: str) -> str:
        if not _PROM_DURATION.match(value) or not any(c != "0" for c in re.sub(r"[a-z]", "", value)):
            raise ValueError('a Prometheus duration such as "15d", "12h" or "2w"')
        return value

    @field_validator("retention_size")
    @classmethod
    def _retention_size(cls, value: str | None) -> str | None:
        if value is not None and (not _PROM_SIZE.match(value) or int(re.sub(r"[A-Z]", "", value)) == 0):
            raise ValueError('a size such as "512MB" or "10GB" (B, KB, MB, GB, TB, PB or EB)')
        return value


class Document(_Model):
    """The top level. Sections merged by hand are kept untyped here and typed per host later."""

    version: Literal[1] = Field(description="version: 1 (the inventory format)")
    cluster: str = Field(description="a cluster name like vision-prod")
    defaults: dict[str, Any] = {}
    groups: dict[str, dict[str, Any]]
    balancer: BalancerConfig
    rollout: RolloutSpec = RolloutSpec()
    health: HealthSpec = HealthSpec()
    redis: RedisSettings | None = None
    prometheus: PrometheusSettings | None = None

    @field_validator("cluster")
    @classmethod
    def _cluster(cls, value: str) -> str:
        if not NAME_RE.match(value):
            raise ValueError(f"a name of {NAME_EXPECTED}")
        return value
