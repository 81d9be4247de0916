"""The fan-out planner on synthetic hosts: who fetches what from whom, per round."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from llamactl.inventory import PipSettings
from llamactl.plan.deploy import DesiredHost, Upload, plan_host
from llamactl.plan.facts import HostFacts
from llamactl.plan.fanout import HostNeeds, Item, host_needs, plan_fanout, without_bulk
from llamactl.plan.release import Artifact, ModelUpload, Release

MODEL = Item("aa" * 32, 1_000_000_000, "/srv/models/m/model.safetensors")
WHEEL = Item("bb" * 32, 30_000, "/opt/llamactl/wheels/llamactl.whl")


def hosts(n: int, items: tuple[Item, ...] = (MODEL, WHEEL)) -> list[HostNeeds]:
    return [HostNeeds(f"h{i}", items) for i in range(1, n + 1)]


def check_complete(needs: list[HostNeeds], plan, degree: int = 2) -> None:  # type: ignore[no-untyped-def]
    """Every need met exactly once; sources held the file in an earlier round; per round a source
    serves at most ``degree`` hosts."""
    got = Counter((f.host, f.item.dest) for r in plan.rounds for f in r)
    assert got == Counter((h.host, i.dest) for h in needs for i in h.needs)
    holders: dict[str, set[str]] = {}
    for h in needs:
        for digest in h.holds:
            holders.setdefault(digest, set()).add(h.host)
    for r in plan.rounds:
        served: dict[str, set[str]] = {}
        for f in r:
            for s in f.sources:
                assert s in holders.get(f.item.digest, set()), (f, holders)
                assert plan.serves[s][f.item.digest]
            if f.sources:
                served.setdefault(f.sources[0], set()).add(f.host)
        assert all(len(v) <= degree for v in served.values()), served
        for f in r:
            holders.setdefault(f.item.digest, set()).add(f.host)


@pytest.mark.parametrize("n", [1, 2, 3, 8, 50, 300])
def test_the_controller_sends_each_file_once_and_rounds_grow_logarithmically(n: int) -> None:
    needs = hosts(n)
    plan = plan_fanout(needs)
    check_complete(needs, plan)
    assert plan.controller_bytes == MODEL.size + WHEEL.size
    assert plan.peer_bytes == (n - 1) * (MODEL.size + WHEEL.size)
    assert len(plan.rounds) == 1 + math.ceil(math.log(n, 3) - 1e-9)


def test_eight_hosts_take_three_rounds_and_seeds_go_to_different_hosts() -> None:
    plan = plan_fanout(hosts(8))
    assert len(plan.rounds) == 3
    seeds = [(f.host, f.item.dest) for f in plan.rounds[0]]
    assert seeds == [("h1", MODEL.dest), ("h2", WHEEL.dest)]  # the biggest file first, each to another host
    # round 2: h1 serves the model to two hosts, with an alternate source when one exists
    r1 = [f for f in plan.rounds[1] if f.item == MODEL]
    assert [f.sources for f in r1] == [("h1",), ("h1",)]
    r2 = [f for f in plan.rounds[2] if f.item == MODEL]
    assert len(r2) == 5 and all(len(f.sources) == 3 for f in r2)


def test_hosts_holding_a_file_serve_it_and_the_controller_sends_nothing() -> None:
    held = HostNeeds("old", (), {MODEL.digest: "/srv/models/m/model.safetensors"})
    needs = [held, *hosts(4, (MODEL,))]
    plan = plan_fanout(needs)
    check_complete(needs, plan)
    assert plan.controller_bytes == 0
    assert plan.rounds[0][0].sources == ("old",)
    assert "old" in plan.serves


def test_nothing_needed_means_no_rounds() -> None:
    plan = plan_fanout([HostNeeds("a", ()), HostNeeds("b", ())])
    assert plan.rounds == () and plan.controller_bytes == 0


def test_degree_bounds_each_sources_fetchers_per_round() -> None:
    needs = hosts(40)
    for degree in (1, 3):
        plan = plan_fanout(needs, degree=degree)
        check_complete(needs, plan, degree)
    with pytest.raises(ValueError):
        plan_fanout(needs, degree=0)


def test_many_small_files_are_seeded_across_hosts() -> None:
    wheels = tuple(Item(f"{i:064x}", 1000 + i, f"/opt/llamactl/wheelhouse/w{i}.whl") for i in range(57))
    needs = hosts(8, wheels)
    plan = plan_fanout(needs)
    check_complete(needs, plan)
    per_host = Counter(f.host for f in plan.rounds[0])
    assert len(plan.rounds[0]) == 57 and max(per_host.values()) - min(per_host.values()) <= 1
    assert plan.controller_bytes == sum(w.size for w in wheels)


FACTS = HostFacts(python=(3, 11, 2), venv=True, free_bytes=50 * 1024**3, systemd=True, files={}, wheelhouse={},
                  releases=[], current=None, model_manifest=None, model_present=False, units={})


def test_host_needs_from_a_real_plan(tmp_path: Path) -> None:
    wheel = Artifact(Path("/w/llamactl.whl"), "llamactl.whl", "11" * 32, 10)
    torch = Artifact(Path("/wh/torch.whl"), "torch.whl", "22" * 32, 500)
    numpy = Artifact(Path("/wh/numpy.whl"), "numpy.whl", "33" * 32, 70)
    weights = Artifact(Path("/m/w.bin"), "w.bin", "44" * 32, 9000)
    desired = DesiredHost(name="h1", python="/usr/bin/python3", install_dir="/opt/llamactl", gpus=(), instances=(),
                          files={}, release=Release("r1", wheel, (torch, numpy)), pip=PipSettings(no_index=True),
                          model_path="/srv/m", model_upload=ModelUpload((weights,), {"w.bin": weights.sha256}))
    facts = replace(FACTS, wheelhouse={"torch.whl": 500, "numpy.whl": 1}, model_present=True,
                    model_manifest={"files": {"w.bin": weights.sha256}})
    plan = plan_host(desired, facts)
    needs = host_needs(desired, facts, plan)
    assert [(i.dest, i.digest) for i in needs.needs] == [("/opt/llamactl/wheelhouse/numpy.whl", numpy.sha256),
                                                        ("/opt/llamactl/wheels/llamactl.whl", wheel.sha256)]
    assert needs.holds == {torch.sha256: "/opt/llamactl/wheelhouse/torch.whl", weights.sha256: "/srv/m/w.bin"}
    rest = without_bulk(plan)
    assert not [s for s in rest.steps if isinstance(s, Upload) and s.local_path is not None]
    assert [s for s in rest.steps if not isinstance(s, Upload) or s.local_path is None] == rest.steps
    assert rest.changes == plan.changes and rest.actions == plan.actions


def test_identical_files_on_one_host_never_stall_the_plan() -> None:
    empty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"  # two empty files share a digest
    items = (Item(empty, 0, "/srv/m/a.txt"), Item(empty, 0, "/srv/m/b.txt"))
    one = [HostNeeds("solo", items)]
    plan = plan_fanout(one)
    check_complete(one, plan)
    assert [[f.seed for f in r] for r in plan.rounds] == [[True], [True]]
    three = hosts(3, items)
    plan = plan_fanout(three)
    check_complete(three, plan)
