"""Deploying server hosts with the fan-out: every host's plan first, then the bulk files by rounds
(``ops.fanout``), then each host applies the rest of its plan and starts its instances.

Without the fan-out each host does all three alone (``ops.deploy.deploy_host``); here the hosts wait for
each other between phases, which is what lets a host serve a file to the others in the same deploy.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from llamactl.ops.deploy_result import HostOutcome
from llamactl.ops.fanout import Distributor, TransferReport
from llamactl.plan.fanout import host_needs, plan_fanout, shipped_artifacts, without_bulk
from llamactl.remote.parallel import run_parallel

if TYPE_CHECKING:
    from llamactl.ops.deploy import HostJob, Prepared


def deploy_hosts_fanout(job: HostJob, names: list[str], parallel: int,
                        rate_bytes_s: float | None = None) -> tuple[list[HostOutcome], TransferReport]:
    from llamactl.ops.deploy import _finish_host, _prepare_host, guard_host

    outs = {n: HostOutcome(n) for n in names}
    prepared: dict[str, Prepared] = {}
    lock = threading.Lock()

    def settle(name: str) -> None:
        job.progress(name, "done" if outs[name].ok else "failed")
        job.pool.drop(name)

    def prepare(name: str) -> None:
        t0 = time.monotonic()
        got: list[Prepared | None] = [None]
        guard_host(outs[name], lambda: got.__setitem__(0, _prepare_host(job, name, outs[name])))
        outs[name].duration_s += time.monotonic() - t0
        if got[0] is None:
            settle(name)
            return
        with lock:
            prepared[name] = got[0]

    run_parallel(names, prepare, max_workers=parallel)
    ready = [n for n in names if n in prepared]
    local: dict[str, Path] = {}
    for n in ready:
        local.update({a.sha256: a.local_path for a in shipped_artifacts(prepared[n].desired).values()})
    plan = plan_fanout([host_needs(prepared[n].desired, prepared[n].facts, prepared[n].plan) for n in ready])
    report = Distributor(plan, {n: prepared[n].executor for n in ready},
                         {n: job.inv.host(n).address for n in ready}, {n: prepared[n].desired.python for n in ready},
                         local, job.progress, parallel=parallel, rate_bytes_s=rate_bytes_s).run()

    def finish(name: str) -> None:
        out, t0 = outs[name], time.monotonic()
        out.timings["fanout"] = report.hosts[name].seconds
        try:
            error = report.hosts[name].error
            if error:
                out.error = error
                return
            guard_host(out, lambda: _finish_host(job, name, out, replace(prepared[name],
                                                                          plan=without_bulk(prepared[name].plan))))
        finally:
            out.duration_s += time.monotonic() - t0 + report.hosts[name].seconds
            settle(name)

    run_parallel(ready, finish, max_workers=parallel)
    return [outs[n] for n in names], report
