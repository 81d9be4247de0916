"""Deploy: drive the pure per-host plans through executors, hosts in parallel, then wire the balancer.

Order (so a deploy to a serving cluster loses no request):
1. lock on the balancer host; 2. per host in parallel: gather facts, plan, upload, build the release,
   start instances that were not serving and wait until they are ready; 3. instances that were serving
   and whose inputs changed are restarted batch by batch through the balancer (drain, restart, ready,
   canary, undrain); 4. the final balancer config (nginx -t, reload, rollback on failure); 5. audit + unlock.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from llamactl.errors import ConnectError, LlamactlError, OperationFailed
from llamactl.inventory import Inventory
from llamactl.ops import lock as deploy_lock
from llamactl.ops.connect import Connector, connect_host
from llamactl.ops.readiness import wait_instances_ready
from llamactl.ops.release import build_wheel, make_release, model_upload
from llamactl.plan.command import Command, join
from llamactl.plan.deploy import (
    ENV_DIR,
    MODEL_MANIFEST,
    HostPlan,
    InstanceAction,
    ModelUpload,
    Release,
    Upload,
    plan_host,
)
from llamactl.plan.facts import gather_command, parse_facts
from llamactl.plan.render import render_balancer_files, render_host_files
from llamactl.remote.base import Executor
from llamactl.remote.parallel import run_parallel

Progress = Callable[[str, str], None]  # (host, message)


@dataclass
class FileDiff:
    path: str
    old: bytes | None
    new: bytes
    secret: bool


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
    drained: frozenset[str] = frozenset()  # instances a failed rolling restart left out of the balancer
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return all(h.ok for h in self.hosts) and not self.balancer_error and not self.rolling_error

    @property
    def changed(self) -> int:
        return sum(len(h.changes) for h in self.hosts) + (1 if self.balancer_changed else 0)

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
            "drained": sorted(self.drained),
        }


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def deploy_host(
    inv: Inventory,
    host_name: str,
    releases: dict[str | None, Release],
    models: dict[str, ModelUpload],
    *,
    connector: Connector,
    dry_run: bool,
    progress: Progress,
) -> HostOutcome:
    spec = inv.host(host_name)
    out = HostOutcome(host_name)
    t0 = time.monotonic()

    def mark(stage: str, since: float) -> float:
        now = time.monotonic()
        out.timings[stage] = now - since
        return now

    executor: Executor | None = None
    try:
        progress(host_name, "connecting")
        executor = connector(spec.name, spec.address, spec.ssh)
        t = mark("connect", t0)
        rendered = render_host_files(inv, spec)
        files = {path: (f.content, f.mode) for path, f in rendered.items()}
        digests = {path: _digest(c) for path, (c, _) in files.items()}
        upload_from = spec.model.upload_from
        model_path = spec.model.source if spec.model.source.startswith("/") else None
        progress(host_name, "reading host state")
        facts_out = executor.run(
            gather_command(
                spec.python,
                install_dir=spec.install_dir,
                files=sorted(files),
                wheelhouse_dir=f"{spec.install_dir}/wheelhouse",
                units=[i.unit for i in spec.instances],
                model_path=model_path,
                model_manifest=f"{model_path}/{MODEL_MANIFEST}" if model_path and upload_from else None,
                gpus=bool(spec.gpus),
                env_dir=ENV_DIR,
                user=spec.server.user,
            )
        )
        facts = parse_facts(facts_out.stdout)
        t = mark("gather", t)
        plan = plan_host(
            host=spec.name,
            python=spec.python,
            install_dir=spec.install_dir,
            gpus=list(spec.gpus),
            instances=[(i.id, i.index, i.unit, i.url) for i in spec.instances],
            files=files,
            file_digests=digests,
            facts=facts,
            release=releases[str(spec.pip.wheelhouse) if spec.pip.wheelhouse else None],
            pip_settings={
                "index_url": spec.pip.index_url,
                "extra_index_urls": list(spec.pip.extra_index_urls),
                "find_links": list(spec.pip.find_links),
                "no_index": spec.pip.no_index,
            },
            model_path=model_path,
            model_upload=models.get(str(upload_from)) if upload_from else None,
            service_user=spec.server.user,
        )
        out.plan = plan
        if plan.problems:
            out.error = "; ".join(plan.problems)
            return out
        if dry_run:
            for step in plan.steps:
                if isinstance(step, Upload) and step.content is not None and step.remote_path in files:
                    out.diffs.append(FileDiff(step.remote_path, executor.read_bytes(step.remote_path),
                                              step.content, step.secret))
            out.ok = True
            return out
        for step in plan.steps:
            if isinstance(step, Upload):
                progress(host_name, f"uploading {step.remote_path}")
                if step.content is not None:
                    executor.put_bytes(step.content, step.remote_path, mode=step.mode)
                else:
                    assert step.local_path is not None
                    executor.put_file(step.local_path, step.remote_path, mode=step.mode)
            else:
                progress(host_name, step.why)
                executor.run(step.command, timeout_s=1800)
        t = mark("apply", t)
        fresh = [a for a in plan.actions if a.action == "start"]
        out.restarts = [a for a in plan.actions if a.action == "restart"]
        if fresh:
            progress(host_name, f"starting {len(fresh)} instance(s)")
            # reset-failed first: a unit that crash-looped into its start limit refuses a plain start
            units = join([a.unit for a in fresh])
            executor.run(Command.sh(f"systemctl reset-failed {units} 2>/dev/null; systemctl start {units}",
                                    "start instances"))
            progress(host_name, "waiting for ready")
            failures = wait_instances_ready([a.url for a in fresh], timeout_s=inv.rollout.ready_timeout_s,
                                            alive=executor.connected)
            if failures and not executor.connected():
                raise ConnectError(host_name, "the SSH connection was lost while waiting for the instances to be "
                                   "ready: " + "; ".join(failures.values()))
            if failures:
                details = []
                for act in fresh:
                    if act.url in failures:
                        journal = executor.run(
                            Command.of("journalctl", "-u", act.unit, "-n", "15", "--no-pager", "-o", "cat"),
                            check=False,
                        )
                        details.append(f"{act.unit}: {failures[act.url]}\n{journal.stdout.strip()}")
                raise LlamactlError("instance(s) not ready:\n" + "\n".join(details))
            mark("ready", t)
        out.ok = True
        return out
    except ConnectError as exc:
        out.error = str(exc)
        out.unreachable = True
        return out
    except LlamactlError as exc:
        out.error = str(exc)
        return out
    except Exception as exc:  # noqa: BLE001 - an unexpected failure on one host must not stop the others
        out.error = f"{type(exc).__name__}: {exc}"
        return out
    finally:
        out.duration_s = time.monotonic() - t0
        progress(host_name, "done" if out.ok else "failed")
        if executor is not None:
            executor.close()


def deploy(
    inv: Inventory,
    *,
    dry_run: bool = False,
    parallel: int = 16,
    wheel: Path | None = None,
    force_unlock: bool = False,
    connector: Connector = connect_host,
    progress: Progress = lambda host, msg: None,
    command_line: str = "llamactl deploy",
) -> DeployResult:
    t0 = time.monotonic()
    base = make_release(build_wheel(wheel), None)
    releases: dict[str | None, Release] = {None: base}
    for spec in inv.hosts:
        if spec.pip.wheelhouse and str(spec.pip.wheelhouse) not in releases:
            releases[str(spec.pip.wheelhouse)] = make_release(base.wheel.local_path, Path(spec.pip.wheelhouse))
    models: dict[str, ModelUpload] = {}
    for spec in inv.hosts:
        if spec.model.upload_from and str(spec.model.upload_from) not in models:
            models[str(spec.model.upload_from)] = model_upload(Path(spec.model.upload_from))

    balancer_execs: dict[str, Executor] = {}
    result = DeployResult(base.release_id, dry_run, [])
    try:
        for bh in inv.balancer.hosts:
            progress(bh.name, "connecting")
            balancer_execs[bh.name] = connector(bh.name, bh.address, bh.ssh)
        lock_exec = balancer_execs[inv.balancer.hosts[0].name]
        if not dry_run:
            deploy_lock.acquire(lock_exec, command_line, force=force_unlock)
        try:
            outcomes = run_parallel(
                [h.name for h in inv.hosts],
                lambda name: deploy_host(inv, name, releases, models, connector=connector,
                                         dry_run=dry_run, progress=progress),
                max_workers=parallel,
            )
            result.hosts = [o.value if o.ok else HostOutcome(name, error=str(o.error))  # type: ignore[union-attr]
                            for name, o in zip([h.name for h in inv.hosts], outcomes)]
            if not dry_run:
                _rolling_restarts(inv, result, balancer_execs, progress, connector)
            _apply_balancer(inv, result, balancer_execs, dry_run, progress)
        finally:
            if not dry_run:
                result.duration_s = time.monotonic() - t0
                deploy_lock.audit(lock_exec, command_line, result.to_json())
                deploy_lock.release(lock_exec)
    finally:
        for ex in balancer_execs.values():
            ex.close()
    result.duration_s = time.monotonic() - t0
    return result


def _rolling_restarts(
    inv: Inventory, result: DeployResult, balancers: dict[str, Executor], progress: Progress, connector: Connector
) -> None:
    pending = [a for h in result.hosts if h.ok for a in h.restarts]
    if not pending:
        return
    from llamactl.ops.rolling import RollingRestartFailed, rolling_restart

    wanted = {a.instance_id for a in pending}
    instances = [i for i in inv.instances() if i.id in wanted]
    progress("balancer", f"rolling restart of {len(instances)} instance(s)")
    # A cluster of one instance cannot restart without an outage; deploy does it anyway (the change
    # list says "restart"), where `llamactl restart --rolling` would refuse without --force.
    single = len(inv.instances()) == 1
    try:
        rolling_restart(inv, instances, balancer_executors=balancers, progress=progress, connect=connector,
                        force=single, reason="deploy")
    except RollingRestartFailed as exc:
        result.rolling_error = str(exc)
        result.drained = exc.result.drained
    except LlamactlError as exc:
        result.rolling_error = str(exc)


def _apply_balancer(
    inv: Inventory, result: DeployResult, balancers: dict[str, Executor], dry_run: bool, progress: Progress
) -> None:
    from llamactl.ops.balancer import apply_balancer_config

    progress("balancer", "checking balancer config")
    try:
        if dry_run:
            ex = balancers[inv.balancer.hosts[0].name]
            for path, f in sorted(render_balancer_files(inv).items()):
                old = ex.read_bytes(path)
                if old != f.content:
                    result.balancer_diff.append(FileDiff(path, old, f.content, False))
            result.balancer_changed = bool(result.balancer_diff)
        else:
            # a failed instance stays drained (the rolling restart's promise); the rest goes live
            res = apply_balancer_config(inv, balancers, result.drained, reason="deploy")
            result.balancer_changed = res.changed
    except LlamactlError as exc:
        result.balancer_error = str(exc)


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
        raise OperationFailed("deploy failed: " + "; ".join(parts))
