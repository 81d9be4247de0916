"""The CPU budget of one server process: how many compute threads it uses and, optionally, which CPUs.

A host with several GPUs runs one server per GPU. Left alone, each process sizes its torch/OpenMP pool to every
CPU of the machine, so N servers start N full pools that preempt each other's Python model threads (the thread
that launches every GPU kernel). The rendered env file tells each server its slot on the host
(``LLAMACTL_HOST_SLOT=i/n``); from that the server takes 1/n of the CPUs' physical cores for its threads and,
with ``LLAMACTL_CPU_PINNING=true``, pins itself to its own share of whole cores (both hyperthreads of a core go
to the same server, so two model threads never share a core).

``plan_budget`` is pure; ``read_topology`` and ``apply_budget`` are the edges (sysfs, sched_setaffinity, env).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

SLOT_RE = re.compile(r"(\d+)/(\d+)\Z")
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class CpuBudget:
    threads: int
    cpus: tuple[int, ...]
    pinned: bool
    source: str  # where the thread count came from: "cpu_threads", "OMP_NUM_THREADS" or "auto"

    def describe(self) -> dict[str, object]:
        return {"threads": self.threads, "cpus": format_cpus(self.cpus), "pinned": self.pinned,
                "threads_from": self.source}


def parse_slot(text: str) -> tuple[int, int]:
    """``"1/2"`` -> (1, 2). Raises ValueError unless 0 <= index < count."""
    m = SLOT_RE.match(text.strip())
    if not m:
        raise ValueError(f"expected INDEX/COUNT like 0/2, found {text!r}")
    index, count = int(m.group(1)), int(m.group(2))
    if count < 1 or index >= count:
        raise ValueError(f"expected 0 <= INDEX < COUNT, found {text!r}")
    return index, count


def physical_cores(allowed: Iterable[int], topology: Mapping[int, tuple[int, int]]) -> list[list[int]]:
    """Allowed CPUs grouped by (package, core), in order of each core's lowest CPU number.

    A CPU missing from ``topology`` counts as a core of its own.
    """
    groups: dict[tuple[int, int] | tuple[str, int], list[int]] = {}
    for cpu in sorted(set(allowed)):
        key = topology.get(cpu) or ("cpu", cpu)
        groups.setdefault(key, []).append(cpu)
    return sorted(groups.values(), key=lambda cpus: cpus[0])


def plan_budget(
    allowed: Iterable[int],
    topology: Mapping[int, tuple[int, int]],
    *,
    slot: tuple[int, int] = (0, 1),
    threads: int = 0,
    env_threads: str | None = None,
    pin: bool = False,
) -> CpuBudget:
    """Threads and CPUs for slot ``index`` of ``count`` servers on a host.

    Thread count, first that applies: ``threads`` (> 0, the cpu_threads setting), a valid ``env_threads``
    (OMP_NUM_THREADS set by the operator), else the slot's share of physical cores (at least 1).
    Pinning gives slot i the i-th of ``count`` contiguous runs of whole cores; it is skipped (all allowed
    CPUs kept) when there are fewer cores than slots, since sharing a core is what pinning is meant to avoid.
    """
    index, count = slot
    cores = physical_cores(allowed, topology)
    cpus = tuple(c for core in cores for c in core)
    mine = cores
    pinned = False
    if pin and count > 1 and len(cores) >= count:
        per, extra = divmod(len(cores), count)
        start = index * per + min(index, extra)
        mine = cores[start : start + per + (1 if index < extra else 0)]
        cpus = tuple(sorted(c for core in mine for c in core))
        pinned = True
    if threads > 0:
        return CpuBudget(threads, cpus, pinned, "cpu_threads")
    if env_threads is not None and env_threads.strip().isdigit() and int(env_threads) > 0:
        return CpuBudget(int(env_threads), cpus, pinned, "OMP_NUM_THREADS")
    share = len(mine) if pinned else len(cores) // count
    return CpuBudget(max(1, share), cpus, pinned, "auto")


def read_topology(root: Path = Path("/sys/devices/system/cpu")) -> dict[int, tuple[int, int]]:
    """CPU number -> (physical package id, core id) from sysfs; empty where sysfs does not say."""
    topo: dict[int, tuple[int, int]] = {}
    for path in root.glob("cpu[0-9]*/topology"):
        try:
            cpu = int(path.parent.name[3:])
            package = int((path / "physical_package_id").read_text())
            core = int((path / "core_id").read_text())
        except (OSError, ValueError):
            continue
        topo[cpu] = (package, core)
    return topo


def format_cpus(cpus: Iterable[int]) -> str:
    """(0, 1, 2, 5, 7, 8) -> "0-2,5,7-8" (the cpuset list format)."""
    out: list[str] = []
    run: list[int] = []
    for cpu in sorted(set(cpus)):
        if run and cpu == run[-1] + 1:
            run.append(cpu)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [cpu]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def apply_budget(
    *, slot: str, threads: int, pin: bool, environ: MutableMapping[str, str] | None = None
) -> CpuBudget:
    """Plan this process's budget, pin it if asked, and export the thread count before torch is imported.

    Call once at server start, before the model thread exists (threads inherit the affinity).
    """
    env = os.environ if environ is None else environ
    budget = plan_budget(
        os.sched_getaffinity(0),
        read_topology(),
        slot=parse_slot(slot),
        threads=threads,
        env_threads=env.get("OMP_NUM_THREADS"),
        pin=pin,
    )
    if budget.pinned:
        os.sched_setaffinity(0, budget.cpus)
    for name in _THREAD_VARS:  # OpenMP sizes its pool from these when torch first loads
        env[name] = str(budget.threads)
    return budget
