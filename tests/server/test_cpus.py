"""The per-instance CPU budget: pure planning on made-up topologies, plus the real edges on this machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llamactl.server.cpus import (
    apply_budget,
    format_cpus,
    parse_slot,
    physical_cores,
    plan_budget,
    read_topology,
)

# 8 cores x 2 hyperthreads, Linux numbering: CPU n and n+16 are siblings (what most 2-socket-less VMs show).
HT16 = {cpu: (0, cpu % 16) for cpu in range(32)}


def test_cores_group_hyperthread_siblings() -> None:
    cores = physical_cores(range(32), HT16)
    assert len(cores) == 16
    assert cores[0] == [0, 16] and cores[15] == [15, 31]


def test_auto_threads_share_physical_cores_between_slots() -> None:
    assert plan_budget(range(32), HT16, slot=(0, 2)).threads == 8
    assert plan_budget(range(32), HT16, slot=(0, 1)).threads == 16
    assert plan_budget(range(2), {}, slot=(1, 4)).threads == 1  # never 0
    unpinned = plan_budget(range(32), HT16, slot=(1, 2))
    assert not unpinned.pinned and unpinned.cpus == tuple(c for k in range(16) for c in (k, k + 16))


def test_pinning_gives_each_slot_whole_cores_and_no_core_twice() -> None:
    a = plan_budget(range(32), HT16, slot=(0, 2), pin=True)
    b = plan_budget(range(32), HT16, slot=(1, 2), pin=True)
    assert a.pinned and b.pinned
    assert set(a.cpus) == set(range(8)) | set(range(16, 24))
    assert set(b.cpus) == set(range(8, 16)) | set(range(24, 32))
    assert a.threads == b.threads == 8
    cores_a = {HT16[c] for c in a.cpus}
    cores_b = {HT16[c] for c in b.cpus}
    assert not cores_a & cores_b


def test_pinning_splits_uneven_core_counts_and_skips_when_too_few_cores() -> None:
    budgets = [plan_budget(range(5), {}, slot=(i, 3), pin=True) for i in range(3)]
    assert [b.cpus for b in budgets] == [(0, 1), (2, 3), (4,)]
    too_few = plan_budget(range(2), {}, slot=(0, 3), pin=True)
    assert not too_few.pinned and too_few.cpus == (0, 1)


def test_explicit_threads_win_then_operator_env_then_auto() -> None:
    assert plan_budget(range(32), HT16, slot=(0, 2), threads=3, env_threads="5").source == "cpu_threads"
    env = plan_budget(range(32), HT16, slot=(0, 2), env_threads="5")
    assert (env.threads, env.source) == (5, "OMP_NUM_THREADS")
    assert plan_budget(range(32), HT16, slot=(0, 2), env_threads="junk").source == "auto"


@pytest.mark.parametrize("text", ["2/2", "1", "a/b", "0/0", "-1/2"])
def test_bad_slots_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_slot(text)


def test_format_cpus() -> None:
    assert format_cpus([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert format_cpus([]) == ""


def test_read_topology_of_this_machine_covers_its_cpus() -> None:
    topo = read_topology()
    if not Path("/sys/devices/system/cpu/cpu0/topology/core_id").exists():
        pytest.skip("no sysfs CPU topology here")
    assert set(os.sched_getaffinity(0)) <= set(topo)


def test_apply_budget_pins_a_real_process_and_exports_threads(tmp_path: Path) -> None:
    """A child process applies slot 1/2 with pinning: its affinity and OMP_NUM_THREADS are what the plan says."""
    allowed = sorted(os.sched_getaffinity(0))
    code = (
        "import json, os\n"
        "from llamactl.server.cpus import apply_budget\n"
        "b = apply_budget(slot='1/2', threads=0, pin=True)\n"
        "print(json.dumps({'affinity': sorted(os.sched_getaffinity(0)), 'cpus': list(b.cpus),"
        " 'pinned': b.pinned, 'omp': os.environ['OMP_NUM_THREADS'], 'threads': b.threads}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                         cwd=Path(__file__).resolve().parents[2])
    got = json.loads(out.stdout)
    plan = plan_budget(allowed, read_topology(), slot=(1, 2), pin=True)
    assert got["affinity"] == sorted(plan.cpus) == sorted(got["cpus"])
    assert got["pinned"] == plan.pinned
    assert got["omp"] == str(plan.threads) == str(got["threads"])
    if len(physical_cores(allowed, read_topology())) >= 2:
        assert got["pinned"] and set(got["affinity"]) < set(allowed)


def test_apply_budget_keeps_operator_threads_without_pinning() -> None:
    env = {"OMP_NUM_THREADS": "3"}
    b = apply_budget(slot="0/1", threads=0, pin=False, environ=env)
    assert (b.threads, b.pinned, env["OMP_NUM_THREADS"], env["MKL_NUM_THREADS"]) == (3, False, "3", "3")
    assert set(b.cpus) == set(os.sched_getaffinity(0))
