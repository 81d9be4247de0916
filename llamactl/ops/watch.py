"""The edge of ``llamactl watch``: probe, feed the state machine, act, log one JSON line per event.

The decisions live in ``llamactl.plan.watch`` (pure); this loop only probes (llamactl.health),
reads the deploy lock, applies the balancer config when the drained set changes, restarts units over
SSH, keeps the GPU fault records on the balancer host (``ops.gpufault``) and logs.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from llamactl.errors import ConnectError
from llamactl.ops import gpufault
from llamactl.ops import lock as deploy_lock
from llamactl.ops.balancer import NginxControl, apply_balancer_config
from llamactl.ops.connect import Connector, HostPool
from llamactl.ops.units import restart_units
from llamactl.plan.watch import Event, Observation, Policy, State, Step, Watcher

if TYPE_CHECKING:
    from llamactl.health.probe import InstanceProbe
    from llamactl.inventory import Instance, Inventory


def observation(probe: InstanceProbe) -> Observation:
    """Interpret one probe: ready only when /ready says 200; loading carries the server's uptime."""
    health = probe.health
    if health.status is None:
        return Observation("failed", health.error or "no answer")
    try:
        body = json.loads(health.text)
    except ValueError:
        body = {}
    body = body if isinstance(body, dict) else {}
    status = str(body.get("status", f"HTTP {health.status}"))
    uptime = body.get("uptime_s")
    uptime_s = float(uptime) if isinstance(uptime, (int, float)) and not isinstance(uptime, bool) else None
    if probe.ready.status == 200 and status == "ready":
        return Observation("ready", uptime_s=uptime_s)
    if status == "loading":
        return Observation("loading", "loading the model", uptime_s)
    if status == "stalled":
        return Observation("stalled", str(body.get("error") or "engine stalled"), uptime_s)
    if status == "gpu_fault":
        return Observation("gpu_fault", str(body.get("error") or "GPU fault"), uptime_s)
    detail = body.get("error") or f"status {status}, /ready {probe.ready.status or probe.ready.error}"
    return Observation("failed", str(detail), uptime_s)


def probe_all(instances: Sequence[Instance], timeout_s: float) -> dict[str, Observation]:
    from llamactl.health.probe import make_client, probe_instances

    async def sweep() -> list[InstanceProbe]:
        async with make_client(len(instances), timeout_s) as client:
            return await probe_instances(client, [i.url for i in instances], timeout_s)

    probes = asyncio.run(sweep())
    return {inst.id: observation(p) for inst, p in zip(instances, probes)}


class JsonLog:
    """One JSON object per line, to stdout and optionally appended to a file."""

    def __init__(self, stream: IO[str] | None, path: str | None = None) -> None:
        self._stream = stream
        self._file = open(path, "a", encoding="utf-8") if path else None  # noqa: SIM115 - closed in close()
        self._lock = threading.Lock()

    def __call__(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, sort_keys=False, default=str)
        with self._lock:
            for out in (self._stream, self._file):
                if out is not None:
                    out.write(line + "\n")
                    out.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


@dataclass
class WatchLoop:
    inv: Inventory
    policy: Policy
    log: Callable[[dict[str, Any]], None]
    connect: Connector | None = None
    nginx: NginxControl | None = None
    clock: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        self.instances = self.inv.instances()
        self.by_id = {i.id: i for i in self.instances}
        self.watcher = Watcher(self.by_id, self.policy)
        self.pool = HostPool(self.inv, self.connect)
        # The drained set last written to the balancer; None after a deploy held the lock (it rewrote
        # the config): ours is then re-applied, if we have anything drained, once the lock is free.
        self.applied: frozenset[str] | None = frozenset()
        self.faults_loaded = False  # the balancer host's GPU fault records read once at start
        self.unrecorded: dict[str, str] = {}  # faulted instances whose record could not be written yet: detail

    def emit(self, e: Event) -> None:
        self.log({"time": round(self.wall(), 3), **e.as_dict(), "at": round(e.at, 3)})

    def tick(self) -> None:
        now = self.clock()
        self._sync_faults(now)
        observed = probe_all(self.instances, self.inv.health.timeout_s)
        # Only a tick that could act needs the lock: all ready and all healthy changes nothing.
        could_act = (any(o.outcome != "ready" for o in observed.values())
                     or any(self.watcher.state(i) is not State.HEALTHY for i in observed))
        held = self._lock_holder(now) if could_act else None
        restarts: list[str] = []
        for inst_id, obs in observed.items():
            step: Step = self.watcher.observe(now, inst_id, obs, deploy_lock=held)
            for e in step.events:
                self.emit(e)
            restarts += [a.instance for a in step.actions if a.kind == "restart"]
            for a in step.actions:
                if a.kind == "record_fault":
                    self._record_fault(now, a.instance, obs.detail)
        if held is not None:
            self.applied = None  # the deploy owns the balancer config until it is done
            return
        self._sync_balancer(now)  # drain before restarting, undrain what recovered
        if not restarts:
            return
        # watch does not take the deploy lock around its restarts, it only re-reads it just before them:
        # holding it would make a deploy started meanwhile fail ("another deploy or restart is running"),
        # and a watch stopped mid-heal (SIGTERM runs no cleanup) would leave a stale lock that blocks every
        # deploy and watch itself. The race left (a deploy taking the lock between this read and
        # `systemctl restart`, one SSH round trip) costs one restart of an instance already failing its
        # probes, which a rolling restart then finds not ready and reports.
        held = self._lock_holder(now)
        if held is not None:
            self.applied = None
            for inst_id in restarts:
                for e in self.watcher.restart_skipped(now, inst_id, held).events:
                    self.emit(e)
            return
        with ThreadPoolExecutor(max_workers=min(8, len(restarts))) as workers:
            for step in workers.map(self._restart, restarts):
                for e in step.events:
                    self.emit(e)

    def _sync_faults(self, now: float) -> None:
        """Read the fault records: at start, restore them; later, a faulted instance whose record is gone was
        cleared by ``llamactl undrain``. Unreadable records change nothing (retried next tick)."""
        if self.faults_loaded and not self.watcher.faulted:
            return
        lb = self.inv.balancer.hosts[0].name
        try:
            executor, guard = self.pool.get(lb)
            with guard:
                for inst_id, detail in list(self.unrecorded.items()):
                    gpufault.write_record(executor, inst_id, detail)
                    del self.unrecorded[inst_id]
                records = gpufault.recorded(executor)
        except Exception as exc:  # noqa: BLE001 - logged; faulted instances stay drained meanwhile
            self.pool.drop(lb)
            self.log({"time": round(self.wall(), 3), "at": round(now, 3), "event": "gpu_fault_records_unknown",
                      "level": "warning", "detail": f"cannot read the GPU fault records on {lb}: {exc}"})
            return
        steps: list[Step] = []
        if not self.faults_loaded:
            steps += [self.watcher.restore_fault(now, i) for i in sorted(records) if i in self.by_id]
            self.faults_loaded = True
        else:
            steps += [self.watcher.cleared(now, i) for i in sorted(self.watcher.faulted - records)]
        for step in steps:
            for e in step.events:
                self.emit(e)

    def _record_fault(self, now: float, inst_id: str, detail: str) -> None:
        lb = self.inv.balancer.hosts[0].name
        try:
            executor, guard = self.pool.get(lb)
            with guard:
                gpufault.write_record(executor, inst_id, detail)
        except Exception as exc:  # noqa: BLE001 - drained anyway; written again by the next tick's _sync_faults
            self.unrecorded[inst_id] = detail
            self.pool.drop(lb)
            self.log({"time": round(self.wall(), 3), "at": round(now, 3), "event": "gpu_fault_record_failed",
                      "level": "error", "instance": inst_id,
                      "detail": f"cannot record the GPU fault on {lb}: {exc}"})

    def _lock_holder(self, now: float) -> str | None:
        """Who holds the deploy lock (None: free). When it cannot be read, watch heals as before: a
        deploy needs that same balancer host to take the lock, and a dead instance needs its restart."""
        lb = self.inv.balancer.hosts[0].name
        try:
            executor, guard = self.pool.get(lb)
            with guard:
                return deploy_lock.holder(executor)
        except Exception as exc:  # noqa: BLE001 - logged; treated as free
            self.pool.drop(lb)
            self.log({"time": round(self.wall(), 3), "at": round(now, 3), "event": "deploy_lock_unknown",
                      "level": "warning", "detail": f"cannot read the deploy lock on {lb}: {exc}"})
            return None

    def _sync_balancer(self, now: float) -> None:
        wanted = self.watcher.drained
        if self.applied is None and not wanted:
            self.applied = wanted  # nothing of ours to put back over the config the deploy left
        if wanted == self.applied:
            return
        try:
            apply_balancer_config(self.inv, self.pool.balancers(), wanted, reason="watch", nginx=self.nginx)
        except Exception as exc:  # noqa: BLE001 - logged; retried on the next tick
            for name in [bh.name for bh in self.inv.balancer.hosts]:
                self.pool.drop(name)
            self.log({"time": round(self.wall(), 3), "at": round(now, 3), "event": "balancer_failed",
                      "level": "error", "drained": sorted(wanted), "detail": str(exc)})
            return
        self.log({"time": round(self.wall(), 3), "at": round(now, 3), "event": "balancer_applied",
                  "level": "info", "drained": sorted(wanted)})
        self.applied = wanted

    def _restart(self, inst_id: str) -> Step:
        inst = self.by_id[inst_id]
        try:
            executor, lock = self.pool.get(inst.host)
            with lock:
                restart_units(executor, [inst.unit])
        except ConnectError as exc:
            self.pool.drop(inst.host)
            return self.watcher.restart_done(self.clock(), inst_id, ok=False, host_down=True, message=str(exc))
        except Exception as exc:  # noqa: BLE001 - a failed restart is an event, not a crash of watch
            self.pool.drop(inst.host)
            return self.watcher.restart_done(self.clock(), inst_id, ok=False, message=str(exc))
        return self.watcher.restart_done(self.clock(), inst_id, ok=True)

    def run(self, *, once: bool, interval_s: float, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        self.log({"time": round(self.wall(), 3), "event": "watch_started", "level": "info",
                  "cluster": self.inv.cluster, "instances": len(self.instances), "interval_s": interval_s,
                  "fall": self.policy.fall, "rise": self.policy.rise, "budget": self.policy.budget,
                  "window_s": self.policy.window_s})
        try:
            while True:
                started = self.clock()
                self.tick()
                if once or stop.wait(max(0.0, interval_s - (self.clock() - started))):
                    break
        finally:
            self.pool.close()
