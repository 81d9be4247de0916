"""Rolling restart: batch by batch, drain in the balancer, wait idle, restart, ready + canary, undrain.

Never more than ``rollout.max_unavailable`` instances are out of the balancer. The first failure
stops the rollout: the failed instance stays drained, every other instance serves, and the result
says which instance failed at which step and why. An instance marked ``down`` in nginx gets no new
requests while the requests it already has run to completion (old workers finish them after a
reload), so waiting for its own in-flight count to reach 0 makes the restart lose nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from llamactl.errors import OperationFailed, UsageError
from llamactl.ops.balancer import BalancerResult, NginxControl, apply_balancer_config
from llamactl.ops.connect import Connector, HostPool
from llamactl.ops.units import restart_units
from llamactl.plan.batches import plan_batches

if TYPE_CHECKING:
    from llamactl.inventory import Instance, Inventory
    from llamactl.remote import Executor

RestartFn = Callable[["Executor", "Instance"], None]
Phase = Literal["drain", "idle", "restart", "ready", "canary", "undrain"]
ProgressFn = Callable[[str, str], None]  # (where: a host, an instance or "balancer", message)


@dataclass(frozen=True)
class Progress:
    """One thing that happened, for a progress display. ``instance`` is empty for batch-level events."""

    batch: int  # 1-based
    batches: int
    step: Phase | Literal["batch", "done", "warning"]
    instance: str = ""
    message: str = ""
    ok: bool = True


@dataclass(frozen=True)
class Failure:
    instance: str
    step: Phase
    message: str

    def __str__(self) -> str:
        return f"{self.instance}: {self.step} failed: {self.message}"


@dataclass
class RollingResult:
    batches: list[list[str]]
    restarted: list[str] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    drained: frozenset[str] = frozenset()  # left out of the balancer at the end
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        if self.ok:
            return f"rolling restart: {len(self.restarted)} instance(s) restarted in {self.elapsed_s:.1f} s"
        lines = [str(f) for f in self.failures]
        left = ", ".join(sorted(self.drained)) or "none"
        return (f"rolling restart stopped after {len(self.restarted)} restarted instance(s): "
                + "; ".join(lines) + f". Left drained: {left}; every other instance is serving.")


class RollingRestartFailed(OperationFailed):
    """The rollout stopped at its first failure; ``result`` says what was restarted and what is drained."""

    def __init__(self, result: RollingResult) -> None:
        self.result = result
        super().__init__(result.summary())


def restart_instance(executor: Executor, instance: Instance) -> None:
    """The default restart action: the one "(re)start these units" step, for one instance's unit."""
    restart_units(executor, [instance.unit])


@dataclass(frozen=True)
class Checks:
    """The HTTP side of a restart, injectable so tests can bound time (defaults: llamactl.health)."""

    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    interval_s: float = 1.0
    canary_timeout_s: float = 300.0

    def idle(self, url: str, timeout_s: float) -> tuple[bool, str]:
        from llamactl.health.wait import wait_idle

        r = wait_idle(url, timeout_s, self.clock, self.sleep, interval_s=min(0.5, self.interval_s))
        return r.ok, r.describe("idle", url)

    def ready(self, url: str, timeout_s: float, alive: Callable[[], bool] | None = None) -> tuple[bool, str]:
        from llamactl.health.wait import wait_ready

        r = wait_ready(url, timeout_s, self.clock, self.sleep, interval_s=self.interval_s, alive=alive)
        return r.ok, r.describe("ready", url)

    def ready_now(self, url: str) -> bool:
        from llamactl.health.wait import check_ready

        return check_ready(url, 3.0).done

    def canary(self, url: str, api_key: str | None) -> tuple[bool, str]:
        """One real image inference on the instance itself (llamactl.health.canary), staged answer checked."""
        from llamactl.health.canary import run_canary_sync

        r = run_canary_sync(url, timeout_s=self.canary_timeout_s, api_key=api_key)
        if not r.ok:
            return False, f"canary failed: {r.error}"
        return True, f"canary answered in {r.elapsed_s:.1f} s ({r.reasoning_steps} reasoning steps)"


def _any_ready(instances: list[Instance], checks: Checks) -> bool:
    with ThreadPoolExecutor(max_workers=min(32, len(instances))) as workers:
        return any(workers.map(lambda i: checks.ready_now(i.url), instances))


def _api_key(inv: Inventory, instance: Instance) -> str | None:
    keys = inv.host(instance.host).server.api_keys
    return keys.keys[0] if keys is not None and keys.keys else None


def rolling_restart(
    inv: Inventory,
    instances: Sequence[Instance],
    *,
    connect: Connector | None = None,
    pool: HostPool | None = None,
    progress: ProgressFn | None = None,
    on_event: Callable[[Progress], None] | None = None,
    restart_fn: RestartFn | None = None,
    batch: int | str | None = None,
    force: bool = False,
    nginx: NginxControl | None = None,
    checks: Checks | None = None,
    reason: str = "rolling restart",
) -> RollingResult:
    """Restart ``instances`` (a subset of ``inv.instances()``) without dropping a request.

    ``progress(where, message)`` gets one line per step; ``on_event`` the structured ``Progress``.
    ``pool``: the caller's connections (used, left open); else one is made with ``connect``.
    ``restart_fn(executor, instance)`` replaces ``systemctl restart <unit>`` (deploy: activate the new
    release, then restart). Refuses (UsageError) when the cluster has a single instance, since its
    restart is an outage, unless ``force``. Raises ``RollingRestartFailed`` (exit 1, with ``.result``)
    after the first failure; returns the result otherwise."""
    def emit(p: Progress) -> None:
        if on_event is not None:
            on_event(p)
        if progress is not None:
            where = p.instance or f"batch {p.batch}/{p.batches}"
            progress(where, f"{p.step}: {p.message}" if p.step not in ("batch", "done") else p.message)

    cluster = inv.instances()
    if len(cluster) == 1 and instances and not force:
        raise UsageError(
            f"{cluster[0].id} is the only instance of cluster {inv.cluster}: restarting it interrupts "
            "service (a zero-downtime restart needs at least 2 instances); pass --force to restart anyway"
        )
    spec = inv.rollout.batch if batch is None else batch
    groups = plan_batches(instances, spec, inv.rollout.max_unavailable, cluster_size=len(cluster), force=force)
    result = RollingResult([[i.id for i in g] for g in groups])
    checks = checks or Checks()
    restart = restart_fn or restart_instance
    own_pool = pool is None
    hosts = pool if pool is not None else HostPool(inv, connect)
    start = checks.clock()
    try:
        for number, group in enumerate(groups, 1):
            emit(Progress(number, len(groups), "batch", message=", ".join(i.id for i in group)))
            failures = _run_batch(inv, group, number, len(groups), hosts, restart, checks, nginx, emit, reason,
                                  force)
            result.failures.extend(failures)
            if any(f.step == "drain" for f in failures):
                break  # the balancer refused the change: nothing was drained or restarted
            failed_ids = frozenset(f.instance for f in failures)
            # Undrain what came back; a failed instance stays out of the balancer.
            try:
                _apply(inv, hosts, failed_ids, nginx, f"{reason}: undrain batch {number}/{len(groups)}")
            except Exception as exc:  # noqa: BLE001 - reported as a failure, the batch stays drained
                result.failures.append(Failure(",".join(i.id for i in group), "undrain", str(exc)))
                result.restarted.extend(i.id for i in group if i.id not in failed_ids)
                result.drained = frozenset(i.id for i in group)
                break
            result.restarted.extend(i.id for i in group if i.id not in failed_ids)
            result.drained = failed_ids
            for inst in group:
                if inst.id not in failed_ids:
                    emit(Progress(number, len(groups), "undrain", inst.id, "back in the balancer"))
            if failures:
                break
    finally:
        if own_pool:
            hosts.close()
        result.elapsed_s = checks.clock() - start
    emit(Progress(len(groups), len(groups), "done", ok=result.ok,
                      message=result.summary()))
    if not result.ok:
        raise RollingRestartFailed(result)
    return result


def _apply(inv: Inventory, pool: HostPool, drained: frozenset[str], nginx: NginxControl | None,
           reason: str) -> BalancerResult:
    return apply_balancer_config(inv, pool.balancers(), drained, reason=reason, nginx=nginx)


def _run_batch(
    inv: Inventory,
    group: list[Instance],
    number: int,
    total: int,
    pool: HostPool,
    restart: RestartFn,
    checks: Checks,
    nginx: NginxControl | None,
    progress: Callable[[Progress], None],
    reason: str,
    force: bool,
) -> list[Failure]:
    drained = frozenset(i.id for i in group)
    others = [i for i in inv.instances() if i.id not in drained]
    if others and not force and not _any_ready(others, checks):
        ids = ", ".join(sorted(drained))
        return [Failure(ids, "drain", f"no other instance is ready, so draining {ids} would leave nothing "
                        "serving: bring the others back first (llamactl status), or pass --force")]
    try:
        _apply(inv, pool, drained, nginx, f"{reason}: drain batch {number}/{total}")
    except Exception as exc:  # noqa: BLE001 - the balancer was not changed: nothing drained, stop
        return [Failure(i.id, "drain", str(exc)) for i in group]
    for inst in group:
        progress(Progress(number, total, "drain", inst.id, "out of the balancer"))

    def one(inst: Instance) -> Failure | None:
        def report(step: Phase, message: str, ok: bool = True) -> None:
            progress(Progress(number, total, step, inst.id, message, ok))

        idle, message = checks.idle(inst.url, inv.rollout.drain_timeout_s)
        # Past the drain timeout we restart anyway: the server's own SIGTERM drain takes over.
        report("idle", message, idle)
        try:
            executor, lock = pool.get(inst.host)
            with lock:
                restart(executor, inst)
        except Exception as exc:  # noqa: BLE001 - any failure of the restart action stops the rollout
            pool.drop(inst.host)
            report("restart", str(exc), False)
            return Failure(inst.id, "restart", str(exc))
        report("restart", f"{inst.unit} restarted")
        ready, message = checks.ready(inst.url, inv.rollout.ready_timeout_s, alive=executor.connected)
        report("ready", message, ready)
        if not ready:
            if not executor.connected():
                pool.drop(inst.host)  # the next use reconnects, or reports the host unreachable
            return Failure(inst.id, "ready", message)
        if inv.rollout.canary:
            ok, message = checks.canary(inst.url, _api_key(inv, inst))
            report("canary", message, ok)
            if not ok:
                return Failure(inst.id, "canary", message)
        return None

    with ThreadPoolExecutor(max_workers=max(1, len(group))) as workers:
        outcomes = list(workers.map(one, group))
    return [f for f in outcomes if f is not None]
