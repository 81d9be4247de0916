"""Deploy: drive the pure per-host plans through executors, hosts in parallel, then wire the balancer.

Order (so a deploy to a serving cluster loses no request):
1. lock on the balancer host; 2. per host in parallel (``deploy_host``): connect, read its facts, plan,
   apply (upload, build the release), start instances that were not serving and wait until they are
   ready; 3. instances that were serving and whose inputs changed are restarted batch by batch through
   the balancer (drain, restart, ready, canary, undrain); 4. the final balancer config (nginx -t, reload,
   rollback on failure); 5. audit + unlock (``ops.lock.guarded``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llamactl.errors import ConnectError, LlamactlError
from llamactl.inventory import HostSpec, Inventory
from llamactl.ops import lock as deploy_lock
from llamactl.ops import vip as vip_ops
from llamactl.ops.balancer import apply_balancer_config
from llamactl.ops.connect import Connector, HostPool
from llamactl.ops.deploy_result import DeployResult, HostOutcome, HostsUnreachable, raise_for
from llamactl.ops.hostplan import FileDiff, apply_plan, file_diffs, read_facts
from llamactl.ops.readiness import wait_instances_ready
from llamactl.ops.release import build_wheel, make_release, model_upload
from llamactl.ops.rolling import ProgressFn, RollingRestartFailed, rolling_restart
from llamactl.ops.units import restart_units
from llamactl.plan.deploy import (
    DesiredHost,
    HostPlan,
    InstanceAction,
    desired_host,
    plan_host,
)
from llamactl.plan.facts import HostFacts
from llamactl.plan.release import ModelUpload, Release
from llamactl.plan.render import render_balancer_files
from llamactl.plan.units import journal_command
from llamactl.remote.base import Executor
from llamactl.remote.parallel import run_parallel

__all__ = ["DeployResult", "FileDiff", "HostJob", "HostOutcome", "HostsUnreachable", "Shipment", "deploy",
           "deploy_host", "prepare", "raise_for", "start_instances"]


ReleaseKey = tuple[str | None, tuple[str, ...]]  # (pip.wheelhouse, pip.extras)


def release_key(spec: HostSpec) -> ReleaseKey:
    return (str(spec.pip.wheelhouse) if spec.pip.wheelhouse else None, tuple(spec.pip.extras))


@dataclass(frozen=True)
class Shipment:
    """What the controller ships: its release (one per wheelhouse and set of extras) and the model uploads, built
    once."""

    releases: dict[ReleaseKey, Release]
    models: dict[str, ModelUpload]

    @property
    def release_id(self) -> str:
        return self.releases[(None, ())].release_id

    def release_for(self, spec: HostSpec) -> Release:
        return self.releases[release_key(spec)]

    def model_for(self, spec: HostSpec) -> ModelUpload | None:
        return self.models.get(str(spec.model.upload_from)) if spec.model.upload_from else None


def prepare(inv: Inventory, wheel: Path | None = None) -> Shipment:
    """Build (or reuse) the wheel, hash the wheelhouses and model directories the inventory names."""
    base = make_release(build_wheel(wheel), None)
    releases: dict[ReleaseKey, Release] = {(None, ()): base}
    models: dict[str, ModelUpload] = {}
    for spec in inv.hosts:
        key = release_key(spec)
        if key not in releases:
            house, extras = key
            releases[key] = make_release(base.wheel.local_path, Path(house) if house else None, extras)
        if spec.model.upload_from and str(spec.model.upload_from) not in models:
            models[str(spec.model.upload_from)] = model_upload(Path(spec.model.upload_from))
    return Shipment(releases, models)


@dataclass(frozen=True)
class HostJob:
    """Everything one host's deploy needs besides its name."""

    inv: Inventory
    shipment: Shipment
    pool: HostPool
    dry_run: bool
    progress: ProgressFn
    fanout: bool = True  # hosts fetch bulk files from peers (ops.fanout_deploy); False: the controller sends all
    peer_rate_bytes_s: float | None = None  # cap on each peer server's sending rate


class _Stopwatch:
    def __init__(self, timings: dict[str, float]) -> None:
        self.timings, self.last = timings, time.monotonic()

    def mark(self, stage: str) -> None:
        now = time.monotonic()
        self.timings[stage], self.last = now - self.last, now


def deploy_host(job: HostJob, host_name: str) -> HostOutcome:
    """Deploy one server host; every failure becomes the outcome's error (the other hosts carry on)."""
    out = HostOutcome(host_name)
    t0 = time.monotonic()
    try:
        guard_host(out, lambda: _deploy_host(job, host_name, out))
    finally:
        out.duration_s = time.monotonic() - t0
        job.progress(host_name, "done" if out.ok else "failed")
        job.pool.drop(host_name)
    return out


def guard_host(out: HostOutcome, step: Callable[[], object]) -> None:
    """Run one host's step; a failure becomes the outcome's error (the other hosts carry on)."""
    try:
        step()
    except ConnectError as exc:
        out.error, out.unreachable = str(exc), True
    except LlamactlError as exc:
        out.error = str(exc)
    except Exception as exc:  # noqa: BLE001 - an unexpected failure on one host must not stop the others
        out.error = f"{type(exc).__name__}: {exc}"


def _deploy_host(job: HostJob, host_name: str, out: HostOutcome) -> None:
    """The named steps of one host's deploy: connect, read facts, plan, apply, start the new instances."""
    prepared = _prepare_host(job, host_name, out)
    if prepared is not None:
        _finish_host(job, host_name, out, prepared)


@dataclass(frozen=True)
class Prepared:
    """A host connected, its facts read and its plan made: what the fan-out and the apply phase need."""

    executor: Executor
    desired: DesiredHost
    facts: HostFacts
    plan: HostPlan


def _prepare_host(job: HostJob, host_name: str, out: HostOutcome) -> Prepared | None:
    """Connect, read the facts, plan; None when there is nothing left to apply (problems, dry run)."""
    spec = job.inv.host(host_name)
    clock = _Stopwatch(out.timings)
    job.progress(host_name, "connecting")
    executor = job.pool.executor(host_name)
    clock.mark("connect")
    desired = desired_host(job.inv, spec, job.shipment.release_for(spec), job.shipment.model_for(spec))
    job.progress(host_name, "reading host state")
    facts = read_facts(executor, desired)
    clock.mark("gather")
    out.plan = plan = plan_host(desired, facts)
    if plan.problems:
        out.error = "; ".join(plan.problems)
        return None
    if job.dry_run:
        out.diffs = file_diffs(executor, plan, desired)
        out.ok = True
        return None
    return Prepared(executor, desired, facts, plan)


def _finish_host(job: HostJob, host_name: str, out: HostOutcome, prepared: Prepared) -> None:
    """Apply the plan (its bulk uploads already delivered when the fan-out ran) and start new instances."""
    clock = _Stopwatch(out.timings)
    executor, plan = prepared.executor, prepared.plan
    apply_plan(executor, plan, lambda msg: job.progress(host_name, msg))
    clock.mark("apply")
    out.restarts = [a for a in plan.actions if a.action == "restart"]
    fresh = [a for a in plan.actions if a.action == "start"]
    if fresh:
        start_instances(executor, fresh, job.inv.rollout.ready_timeout_s, lambda msg: job.progress(host_name, msg))
        clock.mark("ready")
    out.ok = True


def start_instances(executor: Executor, fresh: list[InstanceAction], ready_timeout_s: float,
                    say: Callable[[str], None]) -> None:
    """Start instances that were not serving and wait for their /ready; a failure carries their journal."""
    say(f"starting {len(fresh)} instance(s)")
    restart_units(executor, [a.unit for a in fresh], "start", "start instances")
    say("waiting for ready")
    failures = wait_instances_ready([a.url for a in fresh], timeout_s=ready_timeout_s, alive=executor.connected)
    if failures and not executor.connected():
        raise ConnectError(executor.host, "the SSH connection was lost while waiting for the instances to be "
                           "ready: " + "; ".join(failures.values()))
    if failures:
        details = []
        for act in fresh:
            if act.url in failures:
                journal = executor.run(journal_command([act.unit], 15, output="cat"), check=False)
                details.append(f"{act.unit}: {failures[act.url]}\n{journal.stdout.strip()}")
        raise LlamactlError("instance(s) not ready:\n" + "\n".join(details))


def deploy(
    inv: Inventory,
    *,
    dry_run: bool = False,
    parallel: int = 16,
    wheel: Path | None = None,
    force_unlock: bool = False,
    connector: Connector | None = None,
    progress: ProgressFn = lambda host, msg: None,
    command_line: str = "llamactl deploy",
    fanout: bool = True,
    peer_rate_bytes_s: float | None = None,
) -> DeployResult:
    t0 = time.monotonic()
    shipment = prepare(inv, wheel)
    result = DeployResult(shipment.release_id, dry_run, [])

    def finished() -> dict[str, object]:
        result.duration_s = time.monotonic() - t0
        return result.to_json()

    with HostPool(inv, connector) as pool:
        for bh in inv.balancer.hosts:
            progress(bh.name, "connecting")
            pool.executor(bh.name)
        job = HostJob(inv, shipment, pool, dry_run, progress, fanout, peer_rate_bytes_s)
        if dry_run:
            _sync_redis(inv, result, pool, dry_run, progress)
            _deploy_hosts(job, parallel, result)
            _apply_balancer(inv, result, pool, dry_run, progress)
            _sync_prometheus(inv, result, pool, dry_run, progress)
            _vip_dry_run(inv, result, pool)
        else:
            with deploy_lock.guarded(pool.lock_host(), command_line, finished, force=force_unlock):
                prepared = _vip_preflight(inv, pool, progress)  # before anything changes
                if not _sync_redis(inv, result, pool, dry_run, progress):
                    result.duration_s = time.monotonic() - t0
                    return result  # stopped before any server host: nothing there changed
                _deploy_hosts(job, parallel, result)
                _rolling_restarts(inv, result, pool, progress)
                _apply_balancer(inv, result, pool, dry_run, progress)
                if prepared is not None:
                    _apply_vip(inv, result, pool, prepared, progress)
                _sync_prometheus(inv, result, pool, dry_run, progress)
                _sync_watch(job, result)
    result.duration_s = time.monotonic() - t0
    return result


def _deploy_hosts(job: HostJob, parallel: int, result: DeployResult) -> None:
    names = [h.name for h in job.inv.hosts]
    if job.fanout and not job.dry_run:
        from llamactl.ops.fanout_deploy import deploy_hosts_fanout

        result.hosts, result.transfer = deploy_hosts_fanout(job, names, parallel, job.peer_rate_bytes_s)
        return
    outcomes = run_parallel(names, lambda name: deploy_host(job, name), max_workers=parallel)
    result.hosts = [o.value if o.ok else HostOutcome(name, error=str(o.error))  # type: ignore[union-attr]
                    for name, o in zip(names, outcomes)]


def _rolling_restarts(inv: Inventory, result: DeployResult, pool: HostPool, progress: ProgressFn) -> None:
    pending = [a for h in result.hosts if h.ok for a in h.restarts]
    if not pending:
        return
    wanted = {a.instance_id for a in pending}
    instances = [i for i in inv.instances() if i.id in wanted]
    progress("balancer", f"rolling restart of {len(instances)} instance(s)")
    # A cluster of one instance cannot restart without an outage; deploy does it anyway (the change
    # list says "restart"), where `llamactl restart --rolling` would refuse without --force.
    single = len(inv.instances()) == 1
    try:
        rolling_restart(inv, instances, pool=pool, progress=progress, force=single, reason="deploy")
    except RollingRestartFailed as exc:
        result.rolling_error = str(exc)
        result.drained = exc.result.drained
    except LlamactlError as exc:
        result.rolling_error = str(exc)


def _sync_redis(inv: Inventory, result: DeployResult, pool: HostPool, dry_run: bool,
                progress: ProgressFn) -> bool:
    """The Redis step (inventory ``redis:``) before the server hosts; False when it failed."""
    if inv.redis is None:
        return True
    from llamactl.ops.redis import sync_redis

    host = inv.redis.host
    try:
        result.redis = sync_redis(inv, pool.executor(host), dry_run, lambda msg: progress(host, msg))
        if result.redis.problems:
            result.redis_error = f"{host}: " + "; ".join(result.redis.problems)
    except LlamactlError as exc:
        result.redis_error = str(exc)
    progress(host, "failed" if result.redis_error else "redis ready")
    return result.redis_error is None


def _sync_watch(job: HostJob, result: DeployResult) -> None:
    from llamactl.ops.watchsvc import sync_watch

    lb = job.pool.lock_host()
    try:
        plan = sync_watch(job.inv, lb, job.shipment.release_for(job.inv.hosts[0]),
                          lambda msg: job.progress(lb.host, f"watch: {msg}"))
        result.watch_changes = plan.changes
        result.watch_error = "; ".join(plan.problems) or None
    except Exception as exc:  # noqa: BLE001 - reported like a host's failure; the cluster itself is deployed
        result.watch_error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, LlamactlError) else str(exc)


def _sync_prometheus(inv: Inventory, result: DeployResult, pool: HostPool, dry_run: bool,
                     progress: ProgressFn) -> None:
    """Prometheus on the balancer hosts (``prometheus:``), after the targets and rules are placed."""
    from llamactl.ops.prometheus import sync_prometheus

    plans = sync_prometheus(inv, pool.balancers(), dry_run=dry_run, say=progress)
    result.prometheus_changes = {h: p.changes for h, p in plans.items() if p.changes}
    errors = [f"{h}: {'; '.join(p.problems)}" for h, p in plans.items() if p.problems]
    result.prometheus_error = "; ".join(errors) or None


def _apply_balancer(inv: Inventory, result: DeployResult, pool: HostPool, dry_run: bool,
                    progress: ProgressFn) -> None:
    progress("balancer", "checking balancer config")
    try:
        if dry_run:
            ex = pool.lock_host()
            for path, f in sorted(render_balancer_files(inv).items()):
                old = ex.read_bytes(path)
                if old != f.content:
                    result.balancer_diff.append(FileDiff(path, old, f.content, False))
            result.balancer_changed = bool(result.balancer_diff)
        else:
            # a failed instance stays drained (the rolling restart's promise); the rest goes live
            res = apply_balancer_config(inv, pool.balancers(), result.drained, reason="deploy")
            result.balancer_changed = res.changed
    except LlamactlError as exc:
        result.balancer_error = str(exc)


def _vip_preflight(inv: Inventory, pool: HostPool, progress: ProgressFn) -> vip_ops.Prepared | None:
    """With ``balancer.vip``: keepalived on every balancer host (installed where missing) or stop here."""
    if inv.balancer.vip is None:
        return None
    progress("balancer", "checking keepalived")
    return vip_ops.preflight(inv, pool.balancers())


def _vip_dry_run(inv: Inventory, result: DeployResult, pool: HostPool) -> None:
    if inv.balancer.vip is None:
        return
    try:
        result.balancer_diff.extend(vip_ops.dry_run_diffs(inv, pool.balancers()))
    except LlamactlError as exc:
        result.vip_error = str(exc)


def _apply_vip(inv: Inventory, result: DeployResult, pool: HostPool, prepared: vip_ops.Prepared,
               progress: ProgressFn) -> None:
    progress("balancer", "keepalived")
    try:
        res = vip_ops.apply_vip(inv, pool.balancers(), prepared, say=progress)
        result.vip, result.vip_changed = res.to_json(), res.changed
    except LlamactlError as exc:
        result.vip_error = str(exc)
