"""What a deploy did: per host, the balancer, the rolling restart and the watch service (``--json``), and
the exit code it maps to."""

from __future__ import annotations

from dataclasses import dataclass, field

from llamactl.errors import OperationFailed
from llamactl.ops.fanout import TransferReport
from llamactl.ops.hostplan import FileDiff
from llamactl.ops.redis import RedisOutcome
from llamactl.plan.deploy import HostPlan, InstanceAction


@dataclass
class HostOutcome:
    host: str
    ok: bool = False
    error: str | None = None
    unreachable: bool = False  # the failure was connecting or authenticating (exit code 3 if all are)
    plan: HostPlan | None = None
    diffs: list[FileDiff] = field(default_factory=list)
    restarts: list[InstanceAction] = field(default_factory=list)
    duration_s: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def changes(self) -> list[str]:
        return self.plan.changes if self.plan else []


@dataclass
class DeployResult:
    release_id: str
    dry_run: bool
    hosts: list[HostOutcome]
    balancer_changed: bool = False
    balancer_error: str | None = None
    balancer_diff: list[FileDiff] = field(default_factory=list)
    rolling_error: str | None = None
    watch_changes: list[str] = field(default_factory=list)  # health.watch: the service on the balancer host
    watch_error: str | None = None
    redis: RedisOutcome | None = None  # inventory redis: the Redis step (llamactl.ops.redis)
    redis_error: str | None = None
    prometheus_changes: dict[str, list[str]] = field(default_factory=dict)  # per balancer host (prometheus:)
    prometheus_error: str | None = None
    drained: frozenset[str] = frozenset()  # instances a failed rolling restart left out of the balancer
    duration_s: float = 0.0
    transfer: TransferReport | None = None  # the fan-out of bulk files (None: dry run or --no-fanout)
    vip: dict[str, object] | None = None  # balancer.vip: keepalived per balancer host and who holds it
    vip_changed: bool = False
    vip_error: str | None = None

    @property
    def ok(self) -> bool:
        return (all(h.ok for h in self.hosts) and not self.balancer_error and not self.rolling_error
                and not self.watch_error and not self.redis_error and not self.prometheus_error
                and not self.vip_error)

    @property
    def changed(self) -> int:
        return (sum(len(h.changes) for h in self.hosts) + (1 if self.balancer_changed else 0)
                + len(self.watch_changes) + (len(self.redis.changes) if self.redis else 0)
                + sum(len(c) for c in self.prometheus_changes.values()) + (1 if self.vip_changed else 0))

    def to_json(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "dry_run": self.dry_run,
            "release": self.release_id,
            "changed": self.changed,
            "duration_s": round(self.duration_s, 3),
            "hosts": {
                h.host: {
                    "ok": h.ok,
                    "error": h.error,
                    "unreachable": h.unreachable,
                    "changed": len(h.changes),
                    "changes": h.changes,
                    "duration_s": round(h.duration_s, 3),
                    "timings": {k: round(v, 3) for k, v in h.timings.items()},
                }
                for h in self.hosts
            },
            "balancer": {"changed": self.balancer_changed, "error": self.balancer_error},
            "rolling_restart_error": self.rolling_error,
            "watch": {"changes": self.watch_changes, "error": self.watch_error},
            "prometheus": {"changes": self.prometheus_changes, "error": self.prometheus_error},
            "drained": sorted(self.drained),
            "transfer": self.transfer.to_json() if self.transfer is not None else None,
            "redis": None if self.redis is None and self.redis_error is None else {
                "host": self.redis.host if self.redis else None,
                "changes": self.redis.changes if self.redis else [],
                "error": self.redis_error,
            },
            **({"vip": {**(self.vip or {}), "error": self.vip_error}} if self.vip or self.vip_error else {}),
        }


class HostsUnreachable(OperationFailed):
    exit_code = 3


def raise_for(result: DeployResult) -> None:
    failed = [h for h in result.hosts if not h.ok]
    if failed and all(h.unreachable for h in failed) and result.ok is False and not result.balancer_error:
        raise HostsUnreachable("cannot reach: " + ", ".join(h.host for h in failed))
    if not result.ok:
        parts = [f"{h.host} ({(h.error or '').splitlines()[0] if h.error else 'failed'})" for h in failed]
        if result.rolling_error:
            parts.append(f"rolling restart ({result.rolling_error})")
        if result.balancer_error:
            parts.append(f"balancer ({result.balancer_error})")
        if result.watch_error:
            parts.append(f"watch service ({result.watch_error})")
        if result.redis_error:
            parts.append(f"redis ({result.redis_error})")
        if result.prometheus_error:
            parts.append(f"prometheus ({result.prometheus_error})")
        if result.vip_error:
            parts.append(f"vip ({result.vip_error})")
        raise OperationFailed("deploy failed: " + "; ".join(parts))
