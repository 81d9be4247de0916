"""Batch planning for rolling restarts (pure)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from llamactl.errors import UsageError
from llamactl.plan.batches import batch_size, parse_batch, plan_batches


@dataclass(frozen=True)
class Inst:
    host: str
    index: int

    @property
    def id(self) -> str:
        return f"{self.host}/{self.index}"


def cluster(*per_host: int) -> list[Inst]:
    return [Inst(f"h{h + 1}", i) for h, n in enumerate(per_host) for i in range(n)]


def ids(batches: list[list[Inst]]) -> list[list[str]]:
    return [[i.id for i in b] for b in batches]


def test_percent_rounds_up() -> None:
    assert parse_batch("25%", 10) == 3
    assert parse_batch("25%", 4) == 1
    assert parse_batch("1%", 3) == 1
    assert parse_batch("100%", 7) == 7
    assert parse_batch("3", 7) == 3


@pytest.mark.parametrize("bad", [0, -1, "0%", "101%", "abc", "%", True])
def test_bad_batch_is_a_usage_error(bad: object) -> None:
    with pytest.raises(UsageError, match="batch: found"):
        parse_batch(bad, 4)  # type: ignore[arg-type]


def test_max_unavailable_zero_is_an_error() -> None:
    with pytest.raises(UsageError, match="rollout.max_unavailable: found 0, expected at least 1"):
        plan_batches(cluster(2), 1, 0)


def test_single_instance_is_one_batch() -> None:
    assert ids(plan_batches(cluster(1), "100%", 5)) == [["h1/0"]]


def test_never_all_at_once_unless_forced() -> None:
    assert ids(plan_batches(cluster(1, 1, 1), "100%", 10)) == [["h1/0", "h2/0"], ["h3/0"]]
    assert ids(plan_batches(cluster(1, 1, 1), "100%", 10, force=True)) == [["h1/0", "h2/0", "h3/0"]]
    # force never lifts max_unavailable
    assert ids(plan_batches(cluster(1, 1, 1), "100%", 2, force=True)) == [["h1/0", "h2/0"], ["h3/0"]]


def test_subset_may_be_drained_whole_when_others_keep_serving() -> None:
    subset = cluster(2)
    assert ids(plan_batches(subset, "100%", 4, cluster_size=6)) == [["h1/0", "h1/1"]]


def test_capped_by_max_unavailable() -> None:
    assert [len(b) for b in plan_batches(cluster(1, 1, 1, 1, 1), 4, 2)] == [2, 2, 1]


def test_hosts_kept_together_when_they_fit() -> None:
    # batch 3, hosts of 2: packing by host gives 2+2+2 rather than splitting h2 across batches
    assert ids(plan_batches(cluster(2, 2, 2), 3, 3)) == [["h1/0", "h1/1"], ["h2/0", "h2/1"], ["h3/0", "h3/1"]]
    assert ids(plan_batches(cluster(1, 2, 1), 2, 2)) == [["h1/0"], ["h2/0", "h2/1"], ["h3/0"]]
    assert ids(plan_batches(cluster(1, 1, 2), 2, 2)) == [["h1/0", "h2/0"], ["h3/0", "h3/1"]]


def test_big_host_is_split_and_tops_up() -> None:
    assert ids(plan_batches(cluster(1, 5), 2, 2)) == [["h1/0", "h2/0"], ["h2/1", "h2/2"], ["h2/3", "h2/4"]]


def test_order_follows_first_appearance_and_index() -> None:
    shuffled = [Inst("b", 1), Inst("a", 0), Inst("b", 0)]
    assert ids(plan_batches(shuffled, 1, 1)) == [["b/0"], ["b/1"], ["a/0"]]


def test_every_instance_exactly_once() -> None:
    insts = cluster(3, 1, 4, 2, 5)
    for spec in (1, 2, 3, "10%", "50%", "100%"):
        for mu in (1, 2, 4, 7):
            batches = plan_batches(insts, spec, mu)
            flat = [i for b in batches for i in b]
            assert sorted(flat, key=lambda i: i.id) == sorted(insts, key=lambda i: i.id)
            assert max(len(b) for b in batches) <= min(mu, len(insts) - 1)


def test_batch_size_reports_caps() -> None:
    assert batch_size("50%", 5, 10) == 3
    assert batch_size(10, 5, 10) == 4
    assert batch_size(10, 1, 10) == 1
    assert plan_batches([], 1, 1) == []
