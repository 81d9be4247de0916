"""One status sweep: every instance, balancer, canary and (with --deep) systemd state, all at once.

This is the code path of ``llamactl status`` and of ``bench/status_sweep.py``. Blocking SSH reads for
--deep run on their own thread pool so they overlap the HTTP probes instead of following them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx

import llamactl
from llamactl.errors import LlamactlError
from llamactl.health.canary import CanaryResult, run_canary
from llamactl.health.probe import InstanceProbe, probe_balancers, probe_instances
from llamactl.health.report import HealthReport, Target, balancer_report, health_report, instance_report
from llamactl.health.systemd import SystemdState, parse_show, show_command

if TYPE_CHECKING:
    from llamactl.inventory import Inventory
    from llamactl.plan.stubstatus import BalancerFigures

CANARY_TIMEOUT_S = 120.0
FIGURES_MARGIN_S = 3.0  # SSH connect + the sampler's one second between its two reads


@dataclass
class SweepPlan:
    """What to probe, taken from the inventory once (the watch loop reuses it)."""

    targets: list[Target]
    balancers: list[tuple[str, str]]  # (name, base URL)
    inventory: Inventory | None = None
    expected_version: str = llamactl.__version__
    problems: list[str] = field(default_factory=list)  # e.g. why an expected config hash is unknown


@dataclass
class SweepOptions:
    timeout_s: float = 3.0
    canary: bool = False
    canary_timeout_s: float = CANARY_TIMEOUT_S
    api_key: str | None = None
    deep: bool = False
    balancer_figures: bool = False  # nginx stub_status over SSH (always with deep; plain `status` asks too)


def expected_config_hash(inv: Inventory, instance: Any) -> str:
    """The hash the server should report when it runs the env file the inventory renders."""
    from llamactl.inventory import expected_env
    from llamactl.server.settings import Settings

    return str(Settings.from_env(expected_env(inv, instance)).config_hash())


def plan_from_inventory(inv: Inventory, hosts: Collection[str] | None = None) -> SweepPlan:
    """Targets for every instance (of ``hosts`` only, when given) and every balancer host."""
    problems: list[str] = []
    targets = []
    for instance in inv.instances():
        if hosts is not None and instance.host not in hosts:
            continue
        try:
            expected: str | None = expected_config_hash(inv, instance)
        except (LlamactlError, ValueError) as exc:
            expected = None
            problems.append(f"{instance.id}: cannot compute the expected config hash: {exc}")
        targets.append(
            Target(
                id=instance.id,
                host=instance.host,
                index=instance.index,
                gpu=instance.gpu,
                address=instance.address,
                port=instance.port,
                url=instance.url,
                expected_config_hash=expected,
            )
        )
    return SweepPlan(targets, balancer_endpoints(inv), inv, problems=problems)


def balancer_endpoints(inv: Inventory) -> list[tuple[str, str]]:
    """Base URL of each balancer host; the first is ``inv.endpoint`` (unless that is the VIP), the others
    follow its scheme and port."""
    hosts = list(inv.balancer.hosts)
    if not hosts:
        return []
    endpoint = inv.endpoint.rstrip("/")
    parsed = httpx.URL(endpoint)
    urls = [(hosts[0].name, endpoint)]
    if inv.balancer.vip is not None:  # the endpoint is the VIP: probe each host at its own address
        urls = []
    for host in hosts[len(urls):]:
        urls.append((host.name, str(parsed.copy_with(host=host.address)).rstrip("/")))
    return urls


def _deep_host(inv: Inventory, host_name: str, units: list[str], timeout_s: float) -> dict[str, SystemdState]:
    from llamactl.ops.connect import HostPool

    try:
        with HostPool(inv) as pool:
            result = pool.executor(host_name).run(show_command(units), check=False, timeout_s=timeout_s)
    except LlamactlError as exc:
        return {u: SystemdState(u, error=str(exc)) for u in units}
    if result.exit_code != 0 and not result.stdout.strip():
        reason = result.stderr.strip().splitlines()[-1:] or [f"exit {result.exit_code}"]
        return {u: SystemdState(u, error=f"systemctl show: {reason[0]}") for u in units}
    return parse_show(result.stdout, units)


async def deep_states(plan: SweepPlan, timeout_s: float) -> dict[str, SystemdState]:
    """Systemd state per instance id, one SSH session per host, hosts in parallel."""
    if plan.inventory is None:
        return {}
    inv = plan.inventory
    by_host: dict[str, list[Target]] = {}
    for target in plan.targets:
        by_host.setdefault(target.host, []).append(target)
    loop = asyncio.get_running_loop()
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(64, max(1, len(by_host)))) as pool:
        futures = [
            loop.run_in_executor(
                pool, _deep_host, inv, name, [f"llamactl@{t.index}.service" for t in ts], timeout_s
            )
            for name, ts in by_host.items()
        ]
        results = await asyncio.gather(*futures)
    states: dict[str, SystemdState] = {}
    for (name, ts), per_unit in zip(by_host.items(), results):
        for t in ts:
            states[t.id] = per_unit[f"llamactl@{t.index}.service"]
    return states


async def _canaries(
    client: httpx.AsyncClient, targets: Sequence[Target], options: SweepOptions
) -> list[CanaryResult]:
    return list(
        await asyncio.gather(
            *(
                run_canary(client, t.url, timeout_s=options.canary_timeout_s, api_key=options.api_key)
                for t in targets
            )
        )
    )


async def _nothing() -> Any:
    return None


async def sweep(
    plan: SweepPlan,
    options: SweepOptions,
    client: httpx.AsyncClient,
    previous: Mapping[str, InstanceProbe] | None = None,
) -> tuple[HealthReport, dict[str, InstanceProbe]]:
    """Probe everything concurrently; returns the report and this sweep's raw probes (for the next rates)."""
    start = time.monotonic()
    urls = [t.url for t in plan.targets]
    probes, balancers, canaries, systemd, figures = await asyncio.gather(
        probe_instances(client, urls, options.timeout_s),
        probe_balancers(client, [u for _, u in plan.balancers], options.timeout_s),
        _canaries(client, plan.targets, options) if options.canary else _nothing(),
        deep_states(plan, options.timeout_s) if options.deep else _nothing(),
        balancer_figures(plan, options.timeout_s) if options.deep or options.balancer_figures else _nothing(),
    )
    elapsed = time.monotonic() - start
    before = previous or {}
    instances = [
        instance_report(
            target,
            probe,
            plan.expected_version,
            previous=before.get(target.id),
            systemd=systemd.get(target.id) if systemd is not None else None,
            canary=canaries[i] if canaries is not None else None,
        )
        for i, (target, probe) in enumerate(zip(plan.targets, probes))
    ]
    lbs = [balancer_report(name, outcome, (figures or {}).get(name))
           for (name, _), outcome in zip(plan.balancers, balancers)]
    report = health_report(
        instances, lbs, plan.expected_version, elapsed, canary=options.canary, deep=options.deep
    )
    return report, {t.id: p for t, p in zip(plan.targets, probes)}


async def balancer_figures(plan: SweepPlan, timeout_s: float) -> dict[str, BalancerFigures | str]:
    """nginx stub_status of every balancer host, sampled over SSH (it listens on loopback only), hosts in
    parallel; a host that cannot be read gets the reason instead. Empty when ``stub_status_port`` is off.

    Bounded: a host whose SSH does not answer within ``timeout_s`` plus the sampling second costs no more
    (plain ``status`` reads these too); its read goes on in a daemon thread that never holds up the exit."""
    inv = plan.inventory
    if inv is None or inv.balancer.stub_status_port is None:
        return {}
    port = inv.balancer.stub_status_port
    names = [bh.name for bh in inv.balancer.hosts]
    loop = asyncio.get_running_loop()
    futures: list[asyncio.Future[BalancerFigures | str]] = []
    for name in names:
        future: asyncio.Future[BalancerFigures | str] = loop.create_future()

        def read(name: str = name, future: asyncio.Future[BalancerFigures | str] = future) -> None:
            value = _figures_of(inv, name, port, timeout_s)

            def settle() -> None:
                if not future.done():
                    future.set_result(value)

            with contextlib.suppress(RuntimeError):  # the loop ended: nobody waits for this read anymore
                loop.call_soon_threadsafe(settle)

        threading.Thread(target=read, name=f"stub-status-{name}", daemon=True).start()
        futures.append(future)
    budget = timeout_s + FIGURES_MARGIN_S
    done, _ = await asyncio.wait(futures, timeout=budget)
    return {name: f.result() if f in done else f"stub_status: no answer over SSH within {budget:g} s"
            for name, f in zip(names, futures)}


def _connect_once(name: str, address: str, ssh: Any) -> Any:
    """One SSH attempt, no retries: the balancer figures are a best-effort extra of a quick ``status``."""
    import dataclasses

    from llamactl.remote.ssh import connect
    from llamactl.remote.target import SSHTarget

    return connect(dataclasses.replace(SSHTarget.from_settings(name, address, ssh), retries=0))


def _figures_of(inv: Inventory, name: str, port: int, timeout_s: float) -> BalancerFigures | str:
    from llamactl.ops.connect import HostPool
    from llamactl.plan.stubstatus import StubStatusError, parse_samples, sample_command

    try:
        with HostPool(inv, _connect_once) as pool:
            result = pool.executor(name).run(sample_command(port), check=False, timeout_s=timeout_s + 3)
    except Exception as exc:  # noqa: BLE001 - shown in the balancer's row; never fails the sweep
        return f"stub_status: {exc}"
    if result.exit_code != 0:
        return f"stub_status: exit {result.exit_code}: {(result.stderr or result.stdout).strip()[:200]}"
    try:
        return parse_samples(result.stdout)
    except StubStatusError as exc:
        return f"stub_status: {exc}"


def watch_service_state(inv: Inventory, timeout_s: float) -> str:
    """Whether ``watch`` runs as a service on the first balancer host (``health.watch``): systemd's word for
    the unit (``active``, ``inactive``, ``failed``, ...) or why it could not be read."""
    from llamactl.ops.connect import HostPool
    from llamactl.plan.watchsvc import is_active_command

    try:
        with HostPool(inv) as pool:
            result = pool.lock_host().run(is_active_command(), check=False, timeout_s=timeout_s)
    except LlamactlError as exc:
        return f"unknown ({exc})"
    return result.stdout.strip() or f"unknown (systemctl exited {result.exit_code})"
