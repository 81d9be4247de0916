"""What a deploy did: per host, the balancer, the rolling restart and the watch service (``--json``), and
the exit code it maps to.

The steps after the hosts' own are read through ``DeployResult.sections``, one ``StepSection`` each: whether the
deploy is ok, how many changes it made, the summary's rows and the failure message all iterate that list.
"""

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


@dataclass(frozen=True)
class StepSection:
    """One step after the hosts' own, as the result reports it."""

    name: str  # the summary row's label, and the step's name in the failure message
    error: str | None  # set (non-empty): the step failed, and so did the deploy
    changed: int | None  # counted in DeployResult.changed; None: 0, and a blank "changed" cell in its row
    detail: str  # the row's detail when the step did not fail
    shown: bool = True  # whether the summary has a row for it


# The order "deploy failed: ..." has always named failed steps in; a step not listed here follows these.
_FAILURE_ORDER = ("rolling restart", "balancer", "watch service", "redis", "prometheus", "vip")


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
    def sections(self) -> list[StepSection]:
        """The steps after the hosts', in the summary's order. A new step: its fields, a section here, and its
        key in ``to_json`` (each step's JSON has its own shape, and the keys their order)."""
        vip = self.vip or {}
        redis_changes = self.redis.changes if self.redis else []
        prometheus_changes = [f"{h}: {c}" for h, cs in self.prometheus_changes.items() for c in cs]
        return [
            StepSection("balancer", self.balancer_error, 1 if self.balancer_changed else 0,
                        "config updated" if self.balancer_changed else "unchanged"),
            StepSection("vip", self.vip_error, 1 if self.vip_changed else 0,
                        f"{vip.get('address')} held by {vip.get('holder')} (keepalived "
                        f"{'updated' if self.vip_changed else 'unchanged'})",
                        shown=self.vip is not None or bool(self.vip_error)),
            StepSection("rolling restart", self.rolling_error, None, "", shown=bool(self.rolling_error)),
            StepSection("watch service", self.watch_error, len(self.watch_changes), "; ".join(self.watch_changes),
                        shown=bool(self.watch_error or self.watch_changes)),
            StepSection("redis", self.redis_error, len(redis_changes), "; ".join(redis_changes) or "unchanged",
                        shown=self.redis is not None or bool(self.redis_error)),
            StepSection("prometheus", self.prometheus_error, len(prometheus_changes), "; ".join(prometheus_changes),
                        shown=bool(self.prometheus_error or self.prometheus_changes)),
        ]

    @property
    def ok(self) -> bool:
        return all(h.ok for h in self.hosts) and not any(s.error for s in self.sections)

    @property
    def changed(self) -> int:
        return sum(len(h.changes) for h in self.hosts) + sum(s.changed or 0 for s in self.sections)

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
        steps = sorted((s for s in result.sections if s.error), key=_failure_rank)
        parts += [f"{s.name} ({s.error})" for s in steps]
        raise OperationFailed("deploy failed: " + "; ".join(parts))


def _failure_rank(section: StepSection) -> int:
    return _FAILURE_ORDER.index(section.name) if section.name in _FAILURE_ORDER else len(_FAILURE_ORDER)
