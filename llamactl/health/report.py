"""The health report: what status shows, computed purely from probe results (no sockets, no clock)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from llamactl.health import metrics as m
from llamactl.health.canary import CanaryResult
from llamactl.health.probe import HttpOutcome, InstanceProbe
from llamactl.health.systemd import SystemdState
from llamactl.plan.stubstatus import BalancerFigures

# "stalled": the process answers but its engine has work and has made no step progress for the server's
# stall_timeout_s (a hung step loop); like "down" it is not serving, and `watch` restarts it.
# "gpu_fault": the server's GPU reported a hardware fault (NVML: critical Xid, uncorrectable ECC, row remap);
# not serving, and `watch` drains it without restarting it (a restart cannot fix the card).
State = Literal["ready", "loading", "draining", "stalled", "gpu_fault", "down"]
_SERVER_STATES: dict[str, State] = {
    "ready": "ready", "loading": "loading", "draining": "draining", "stalled": "stalled", "gpu_fault": "gpu_fault",
}  # fmt: skip
_STALLED_WHY = "engine stalled: no step progress with work waiting"


@dataclass(frozen=True)
class Target:
    """One instance to probe, with what the inventory says it should be running."""

    id: str
    host: str
    index: int
    gpu: int | None
    address: str
    port: int
    url: str
    expected_config_hash: str | None = None


@dataclass
class InstanceReport:
    id: str
    host: str
    index: int
    gpu: int | None
    port: int
    url: str
    state: State
    model: str | None = None
    version: str | None = None
    config_hash: str | None = None
    expected_config_hash: str | None = None
    drift: bool = False
    drift_reasons: list[str] = field(default_factory=list)
    gpu_memory_used_bytes: int | None = None
    gpu_memory_total_bytes: int | None = None
    gpu_status: str | None = None  # the server's NVML view: ok / fault / unavailable (None: not reported)
    gpu_flags: list[str] = field(default_factory=list)  # short words for the table: fault, throttle reasons, ECC
    gpu_health: dict[str, Any] | None = None  # the whole /health "gpu" object (--json, --deep)
    in_flight: int | None = None
    queued: int | None = None
    requests_per_s: float | None = None
    rate_window_s: float | None = None  # None: averaged over the server's uptime
    p50_s: float | None = None
    p95_s: float | None = None
    uptime_s: float | None = None
    last_error: str | None = None
    systemd: SystemdState | None = None
    canary: CanaryResult | None = None

    def healthy(self, *, canary_required: bool) -> bool:
        if self.state != "ready":
            return False
        return not canary_required or (self.canary is not None and self.canary.ok)


@dataclass
class BalancerReport:
    name: str
    url: str
    state: Literal["ready", "down"]
    status_code: int | None
    error: str | None
    elapsed_s: float
    # nginx stub_status, read over SSH on the balancer host (balancer.stub_status_port); None: not read
    active_connections: int | None = None
    requests_per_s: float | None = None
    figures_error: str | None = None


@dataclass
class HealthReport:
    instances: list[InstanceReport]
    balancers: list[BalancerReport]
    expected_version: str
    elapsed_s: float
    canary: bool = False
    deep: bool = False

    @property
    def ok(self) -> bool:
        """True only when every instance and balancer is ready (and every canary passed when asked)."""
        return all(i.healthy(canary_required=self.canary) for i in self.instances) and all(
            b.state == "ready" for b in self.balancers
        )

    def summary(self) -> str:
        ready = sum(1 for i in self.instances if i.state == "ready")
        parts = [f"{ready}/{len(self.instances)} instances ready"]
        if self.balancers:
            up = sum(1 for b in self.balancers if b.state == "ready")
            parts.append(f"{up}/{len(self.balancers)} balancers ready")
        if self.canary:
            passed = sum(1 for i in self.instances if i.canary is not None and i.canary.ok)
            parts.append(f"{passed}/{len(self.instances)} canaries passed")
        drifted = sum(1 for i in self.instances if i.drift)
        if drifted:
            parts.append(f"{drifted} drifted")
        parts.append(f"swept in {self.elapsed_s:.2f} s")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "summary": self.summary(), **asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


def _json_body(outcome: HttpOutcome) -> dict[str, Any] | None:
    try:
        body = json.loads(outcome.text)
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _failure(path: str, outcome: HttpOutcome) -> str:
    if outcome.error:
        return f"GET {path}: {outcome.error}"
    body = _json_body(outcome)
    detail = ""
    if body and isinstance(body.get("error"), dict):
        detail = f": {body['error'].get('message', '')}"
    return f"GET {path}: HTTP {outcome.status}{detail}"


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _state_of(health: dict[str, Any] | None, probe: InstanceProbe) -> tuple[State, str | None]:
    """The instance state and, when it is not serving, why."""
    if not probe.health.answered or probe.health.status != 200:
        return "down", _failure("/health", probe.health)
    if health is None:
        return "down", "GET /health: answer is not a JSON object"
    status = str(health.get("status", ""))
    if status == "failed":
        return "down", f"server failed: {health.get('error') or 'no reason given'}"
    if status not in _SERVER_STATES:
        return "down", f"GET /health: unknown status {status!r}"
    if status == "stalled":
        # The server's own error (its stall description) becomes the last error; without one, say why.
        return "stalled", None if health.get("error") else _STALLED_WHY
    if status == "ready" and probe.ready.status != 200:
        # /health says ready but /ready refuses: it changed state between the probes (e.g. started
        # draining), or it is broken; either way it is not serving.
        later = str((_json_body(probe.ready) or {}).get("status", ""))
        if probe.ready.status == 503 and later in ("loading", "draining", "stalled", "gpu_fault"):
            return _SERVER_STATES[later], _STALLED_WHY if later == "stalled" else None
        return "down", _failure("/ready", probe.ready)
    return _SERVER_STATES[status], None


def instance_report(
    target: Target,
    probe: InstanceProbe,
    expected_version: str,
    *,
    previous: InstanceProbe | None = None,
    systemd: SystemdState | None = None,
    canary: CanaryResult | None = None,
) -> InstanceReport:
    """Interpret one instance's probes; ``previous`` (an earlier sweep) turns counters into rates."""
    health = _json_body(probe.health) if probe.health.status == 200 else None
    state, why = _state_of(health, probe)
    report = InstanceReport(
        id=target.id,
        host=target.host,
        index=target.index,
        gpu=target.gpu,
        port=target.port,
        url=target.url,
        state=state,
        expected_config_hash=target.expected_config_hash,
        systemd=systemd,
        canary=canary,
    )
    errors = [why] if why else []
    if health is not None:
        _fill_from_health(report, health, expected_version)
        if health.get("error") and why is None:
            errors.append(f"server: {health['error']}")
    scrape = _scrape(probe, errors)
    if scrape is not None:
        _fill_from_metrics(report, scrape, _scrape(previous, []) if previous else None, probe, previous)
    if canary is not None and not canary.ok:
        errors.append(f"canary: {canary.error}")
    if systemd is not None and systemd.error:
        errors.append(f"systemd: {systemd.error}")
    report.last_error = "; ".join(errors) if errors else None
    return report


def _fill_from_health(report: InstanceReport, health: dict[str, Any], expected_version: str) -> None:
    report.model = health.get("model") if isinstance(health.get("model"), str) else None
    report.version = health.get("version") if isinstance(health.get("version"), str) else None
    report.config_hash = health.get("config_hash") if isinstance(health.get("config_hash"), str) else None
    report.in_flight = _int(health.get("in_flight"))
    report.queued = _int(health.get("queued"))
    uptime = health.get("uptime_s")
    report.uptime_s = float(uptime) if isinstance(uptime, (int, float)) else None
    gpu = health.get("gpu_memory")
    if isinstance(gpu, dict):
        report.gpu_memory_used_bytes = _int(gpu.get("used_bytes"))
        report.gpu_memory_total_bytes = _int(gpu.get("total_bytes"))
    gpu_health = health.get("gpu")
    if isinstance(gpu_health, dict):
        report.gpu_status = str(gpu_health.get("status"))
        report.gpu_flags = gpu_flags(gpu_health)
        report.gpu_health = gpu_health
    if report.version is not None and report.version != expected_version:
        report.drift_reasons.append(f"version {report.version} != {expected_version}")
    expected_hash = report.expected_config_hash
    if report.config_hash is not None and expected_hash is not None and report.config_hash != expected_hash:
        report.drift_reasons.append(f"config {report.config_hash} != {expected_hash}")
    report.drift = bool(report.drift_reasons)


# Throttle reasons worth a flag: the card is held back by heat or power, not idling or following settings.
_THROTTLE_FLAGS = {
    "sw_power_cap": "power-cap", "hw_slowdown": "hw-slowdown", "sw_thermal_slowdown": "thermal",
    "hw_thermal_slowdown": "hw-thermal", "hw_power_brake_slowdown": "power-brake",
}  # fmt: skip


def gpu_flags(gpu: dict[str, Any]) -> list[str]:
    """Short words for the status table from /health's ``gpu`` object (pure)."""
    status = gpu.get("status")
    if status == "unavailable":
        return ["no-nvml"]
    flags = ["FAULT"] if status == "fault" else []
    reasons = gpu.get("throttle_reasons")
    for reason in reasons if isinstance(reasons, list) else []:
        if reason in _THROTTLE_FLAGS:
            flags.append(_THROTTLE_FLAGS[reason])
    ecc = gpu.get("ecc")
    if isinstance(ecc, dict) and (_int(ecc.get("volatile_corrected")) or 0) > 0:
        flags.append(f"ecc-corr:{ecc['volatile_corrected']}")
    rows = gpu.get("row_remap")
    if isinstance(rows, dict) and ((_int(rows.get("correctable")) or 0) + (_int(rows.get("uncorrectable")) or 0)) > 0:
        flags.append(f"remapped:{(_int(rows.get('correctable')) or 0) + (_int(rows.get('uncorrectable')) or 0)}")
    if gpu.get("error"):
        flags.append("read-error")
    return flags


def _scrape(probe: InstanceProbe | None, errors: list[str]) -> m.Scrape | None:
    if probe is None or probe.metrics.status != 200:
        return None
    try:
        return m.parse(probe.metrics.text)
    except m.MetricsParseError as exc:
        errors.append(f"GET /metrics: {exc}")
        return None


def _fill_from_metrics(
    report: InstanceReport,
    scrape: m.Scrape,
    before: m.Scrape | None,
    probe: InstanceProbe,
    previous: InstanceProbe | None,
) -> None:
    if report.in_flight is None:
        report.in_flight = _int(scrape.value(m.RUNNING))
    if report.queued is None:
        report.queued = _int(scrape.value(m.WAITING))
    if report.gpu_memory_used_bytes is None:
        report.gpu_memory_used_bytes = _int(scrape.value(m.GPU_USED))
        report.gpu_memory_total_bytes = _int(scrape.value(m.GPU_TOTAL))
    latency = scrape.histogram(m.LATENCY)
    window = latency
    if before is not None and previous is not None and latency is not None:
        earlier = before.histogram(m.LATENCY)
        delta = latency.minus(earlier) if earlier is not None else None
        seconds = probe.at - previous.at
        if delta is not None and seconds > 0:
            report.requests_per_s = delta.count / seconds
            report.rate_window_s = seconds
            if delta.count > 0:  # no request in the window: keep the lifetime quantiles
                window = delta
    if report.requests_per_s is None and latency is not None and report.uptime_s:
        report.requests_per_s = latency.count / report.uptime_s
    report.p50_s, report.p95_s = m.quantiles(window, (0.5, 0.95))


def balancer_report(name: str, outcome: HttpOutcome, figures: BalancerFigures | str | None = None) -> BalancerReport:
    """``figures``: the stub_status figures, or why they could not be read (a string), or None (not asked)."""
    ok = outcome.status == 200
    error = None if ok else (outcome.error or f"HTTP {outcome.status}")
    report = BalancerReport(
        name, outcome.url, "ready" if ok else "down", outcome.status, error, outcome.elapsed_s
    )
    if isinstance(figures, str):
        report.figures_error = figures
    elif figures is not None:
        report.active_connections = figures.active_connections
        report.requests_per_s = round(figures.requests_per_s, 3)
    return report


def health_report(
    instances: Sequence[InstanceReport],
    balancers: Sequence[BalancerReport],
    expected_version: str,
    elapsed_s: float,
    *,
    canary: bool = False,
    deep: bool = False,
) -> HealthReport:
    return HealthReport(list(instances), list(balancers), expected_version, elapsed_s, canary, deep)
