"""run_parallel: one function over many hosts, bounded concurrency, every outcome kept.

A host that fails (any ``Exception``) becomes an ``Err`` in its slot; the others carry on. Interrupts
(KeyboardInterrupt, SystemExit) are not swallowed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Ok(Generic[R]):
    value: R
    ok = True


@dataclass(frozen=True)
class Err:
    error: Exception
    ok = False


TaskResult = Ok[R] | Err


def run_parallel(items: Iterable[T], fn: Callable[[T], R], max_workers: int) -> list[TaskResult[R]]:
    """``fn(item)`` for every item, at most ``max_workers`` at a time; outcomes in the items' order."""
    todo = list(items)
    if max_workers < 1:
        raise ValueError(f"max_workers must be >= 1, got {max_workers}")

    def guarded(item: T) -> TaskResult[R]:
        try:
            return Ok(fn(item))
        except Exception as exc:  # noqa: BLE001 - one host's failure is data, not a crash
            return Err(exc)

    if not todo:
        return []
    with ThreadPoolExecutor(max_workers=min(max_workers, len(todo)), thread_name_prefix="host") as pool:
        return list(pool.map(guarded, todo))
