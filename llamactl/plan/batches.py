"""Split instances into restart batches (pure).

A batch is the set of instances taken out of the balancer together. Its size comes from
``rollout.batch`` (a count or ``"N%"`` of the instances being restarted, rounded up), is capped by
``rollout.max_unavailable``, and -- unless forced -- never covers every instance of the cluster, since
that would leave nothing serving. A host's instances are kept in one batch when they fit, so a host
is disturbed once rather than several times.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Protocol, TypeVar

from llamactl.errors import UsageError

_PERCENT = re.compile(r"(\d{1,3})%\Z")


class _Placed(Protocol):
    @property
    def host(self) -> str: ...

    @property
    def index(self) -> int: ...


T = TypeVar("T", bound=_Placed)


def parse_batch(spec: int | str, count: int) -> int:
    """Instances per batch for ``count`` instances: ``3`` -> 3, ``"25%"`` of 10 -> 3 (rounded up)."""
    if isinstance(spec, bool):
        raise UsageError(f"batch: found {spec!r}, expected a count of at least 1 or a percentage like 25%")
    if isinstance(spec, int):
        if spec < 1:
            raise UsageError(f"batch: found {spec}, expected a count of at least 1 or a percentage like 25%")
        return spec
    text = spec.strip()
    if text.isdigit():
        return parse_batch(int(text), count)
    match = _PERCENT.match(text)
    if not match or not 1 <= int(match.group(1)) <= 100:
        raise UsageError(f"batch: found {spec!r}, expected a count of at least 1 or a percentage from 1% to 100%")
    return max(1, math.ceil(count * int(match.group(1)) / 100))


def batch_size(
    spec: int | str, count: int, max_unavailable: int, *, cluster_size: int | None = None, force: bool = False
) -> int:
    """The effective batch size after the max_unavailable and never-all-at-once caps."""
    if max_unavailable < 1:
        raise UsageError(f"rollout.max_unavailable: found {max_unavailable}, expected at least 1")
    size = min(parse_batch(spec, count), max_unavailable, max(count, 1))
    total = count if cluster_size is None else cluster_size
    if not force and total > 1:
        size = min(size, total - 1)  # keep at least one instance serving
    return max(1, size)


def plan_batches(
    instances: Sequence[T],
    spec: int | str,
    max_unavailable: int,
    *,
    cluster_size: int | None = None,
    force: bool = False,
) -> list[list[T]]:
    """Batches in restart order. ``cluster_size`` is the number of instances in the whole cluster
    (defaults to ``len(instances)``): restarting a subset may use a batch equal to the subset.
    ``force`` lifts only the never-all-at-once cap, never ``max_unavailable``."""
    if not instances:
        return []
    size = batch_size(spec, len(instances), max_unavailable, cluster_size=cluster_size, force=force)
    host_order: dict[str, int] = {}
    for inst in instances:
        host_order.setdefault(inst.host, len(host_order))
    groups: dict[str, list[T]] = {}
    for inst in sorted(instances, key=lambda i: (host_order[i.host], i.index)):
        groups.setdefault(inst.host, []).append(inst)

    batches: list[list[T]] = []
    current: list[T] = []
    for group in groups.values():
        if len(current) + len(group) <= size:
            current.extend(group)
            continue
        if len(group) <= size:  # fits a batch of its own: do not split this host
            batches.append(current)
            current = list(group)
            continue
        # A host larger than a batch must be split; top up the current batch first.
        rest = list(group)
        while rest:
            room = size - len(current)
            current.extend(rest[:room])
            rest = rest[room:]
            if len(current) == size:
                batches.append(current)
                current = []
    if current:
        batches.append(current)
    return [b for b in batches if b]
