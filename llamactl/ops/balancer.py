"""Apply a rendered balancer config safely: upload, ``nginx -t`` on the host, reload, confirm.

A broken config never reaches a running nginx: when the test fails the previous file goes back
(or the new one is removed when there was none), nginx is not reloaded and keeps serving, and the
error carries nginx's own message. Deploy, rolling restart and watch all go through here. The commands
come from ``llamactl.plan.nginx``; this module only runs them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llamactl.errors import LlamactlError
from llamactl.plan.nginx import NginxControl, parse_pids, remove_command, workers_command

if TYPE_CHECKING:
    from llamactl.inventory import Inventory
    from llamactl.plan.command import Command
    from llamactl.plan.render import RenderedFile
    from llamactl.remote import Executor

__all__ = ["BACKUP_SUFFIX", "BalancerConfigError", "BalancerResult", "HostChange", "NginxControl",
           "apply_balancer_config", "apply_files", "parse_pids"]

BACKUP_SUFFIX = ".llamactl-prev"


@dataclass(frozen=True)
class HostChange:
    host: str
    changed_paths: list[str]
    reloaded: bool


@dataclass(frozen=True)
class BalancerResult:
    changed: bool
    reason: str
    drained: frozenset[str]
    hosts: list[HostChange] = field(default_factory=list)


class BalancerConfigError(LlamactlError):
    """``nginx -t`` rejected the new config (it was rolled back), or the reload did not take."""

    def __init__(self, host: str, path: str, message: str, nginx_output: str) -> None:
        self.host = host
        self.path = path
        self.nginx_output = nginx_output
        self.message = message
        detail = "\n  ".join(nginx_output.strip().splitlines()[-8:])
        super().__init__(f"{host}: {path}: {message}" + (f"\n  {detail}" if detail else ""))


def apply_balancer_config(
    inv: Inventory,
    executors_by_balancer_host: Mapping[str, Executor],
    drained: frozenset[str] = frozenset(),
    *,
    reason: str,
    nginx: NginxControl | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> BalancerResult:
    """Render the balancer files with ``drained`` instances marked ``down`` and apply them on every
    balancer host (in inventory order; the first failure stops and raises)."""
    from llamactl.plan.render import render_balancer_files

    files = render_balancer_files(inv, drained)
    control = nginx or NginxControl()
    path = inv.balancer.config_path
    # Two phases, so every balancer host serves the same config: upload + `nginx -t` on each host, then
    # reload each. A host that rejects it gets its previous file back, and so does every host before it.
    staged: list[_Staged] = []
    for bh in inv.balancer.hosts:
        executor = executors_by_balancer_host[bh.name]
        try:
            staged.append(_stage(executor, files, path, control))
        except BalancerConfigError as exc:
            raise _rolled_back_everywhere(exc, staged, path) from None
    changes = [_finish(s, path, control, sleep=sleep, clock=clock) for s in staged]
    return BalancerResult(
        changed=any(c.changed_paths for c in changes), reason=reason, drained=drained, hosts=changes
    )


@dataclass
class _Staged:
    executor: Executor
    changed: list[str]
    nginx_new: RenderedFile | None
    nginx_old: bytes | None


def _rolled_back_everywhere(exc: BalancerConfigError, staged: list[_Staged], path: str) -> BalancerConfigError:
    """Put the previous nginx config back on the hosts that had already passed the test (not reloaded)."""
    notes = []
    for s in staged:
        if s.nginx_new is None:
            continue
        try:
            _restore(s.executor, path, s.nginx_old, s.nginx_new.mode)
            notes.append(f"{s.executor.host}: passed the test; its previous config was put back too")
        except Exception as err:  # noqa: BLE001 - reported with the original problem
            notes.append(f"{s.executor.host}: putting its previous config back FAILED ({err}); nginx was not "
                         f"reloaded there, the previous file is at {path}{BACKUP_SUFFIX}")
    if not notes:
        return exc
    return BalancerConfigError(exc.host, exc.path, exc.message + "; "
                               + "; ".join(notes), exc.nginx_output)


def apply_files(
    executor: Executor,
    files: Mapping[str, RenderedFile],
    nginx_config_path: str,
    control: NginxControl,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> HostChange:
    """Upload the changed files to one balancer host; the nginx config goes through test + reload."""
    return _finish(_stage(executor, files, nginx_config_path, control), nginx_config_path, control,
                   sleep=sleep, clock=clock)


def _stage(executor: Executor, files: Mapping[str, RenderedFile], nginx_config_path: str,
           control: NginxControl) -> _Staged:
    """Upload what changed; the nginx config is tested and, when rejected, put back (then raises)."""
    changed: list[str] = []
    nginx_new: RenderedFile | None = None
    nginx_old: bytes | None = None
    for path, rendered in files.items():
        current = executor.read_bytes(path)
        if current == rendered.content:
            continue
        changed.append(path)
        if path == nginx_config_path:
            nginx_new, nginx_old = rendered, current
        else:  # Prometheus file_sd targets: picked up by Prometheus on its own, nothing to test
            executor.put_bytes(rendered.content, path, rendered.mode)
    if nginx_new is None:
        return _Staged(executor, changed, None, None)

    if nginx_old is not None:
        executor.put_bytes(nginx_old, nginx_config_path + BACKUP_SUFFIX, nginx_new.mode)
    executor.put_bytes(nginx_new.content, nginx_config_path, nginx_new.mode)
    test = executor.run(control.test, check=False)
    if test.exit_code != 0:
        try:
            _restore(executor, nginx_config_path, nginx_old, nginx_new.mode)
            restored = "the previous config was put back and nginx keeps serving it (not reloaded)"
        except Exception as exc:  # noqa: BLE001 - reported with the original problem
            restored = (f"putting the previous config back FAILED ({exc}); nginx was not reloaded and "
                        f"keeps serving, the previous file is at {nginx_config_path}{BACKUP_SUFFIX}")
        raise BalancerConfigError(
            executor.host,
            nginx_config_path,
            f"nginx rejected the new config (`{control.test.display()}` exited {test.exit_code}); {restored}",
            test.stderr + test.stdout,
        )
    return _Staged(executor, changed, nginx_new, nginx_old)


def _finish(staged: _Staged, nginx_config_path: str, control: NginxControl, *,
            sleep: Callable[[float], None], clock: Callable[[], float]) -> HostChange:
    if staged.nginx_new is None:
        return HostChange(staged.executor.host, staged.changed, reloaded=False)
    _reload(staged.executor, nginx_config_path, control, sleep=sleep, clock=clock)
    return HostChange(staged.executor.host, staged.changed, reloaded=True)


def _restore(executor: Executor, path: str, previous: bytes | None, mode: int) -> None:
    if previous is None:
        executor.run(remove_command(path))
    else:
        executor.put_bytes(previous, path, mode)


def _reload(
    executor: Executor,
    path: str,
    control: NginxControl,
    *,
    sleep: Callable[[float], None],
    clock: Callable[[], float],
) -> None:
    under_systemd = False
    if control.reload is None or control.master_pid is None:
        under_systemd = executor.run(control.is_active(), check=False).exit_code == 0
    reload_cmd, pid_cmd = control.reload_commands(under_systemd)
    before = _workers(executor, pid_cmd)
    if not before:
        raise BalancerConfigError(
            executor.host,
            path,
            f"nginx is not running (`{pid_cmd.display()}` found no master with workers); the new config "
            "passed the test and is in place: start nginx to serve it",
            "",
        )
    executor.run(reload_cmd)
    # A reload is asynchronous: the master re-reads the config and forks new workers. If it cannot
    # apply the config (a file that vanished since the test, a port in use) it keeps the old workers.
    deadline = clock() + control.confirm_timeout_s
    while True:
        after = _workers(executor, pid_cmd)
        if after - before:
            break
        if clock() >= deadline:
            raise BalancerConfigError(
                executor.host,
                path,
                f"`{reload_cmd.display()}` ran but nginx started no new workers within "
                f"{control.confirm_timeout_s:g} s: the reload did not take, see nginx's error log",
                "",
            )
        sleep(0.1)
    if under_systemd:
        executor.run(control.is_active())


def _workers(executor: Executor, pid_cmd: Command) -> frozenset[int]:
    """PIDs of the master's children (workers and cache processes)."""
    pid = executor.run(pid_cmd, check=False).stdout.strip()
    if not pid.isdigit() or pid == "0":
        return frozenset()
    return parse_pids(executor.run(workers_command(int(pid)), check=False).stdout)
