"""Choosing kernels at start, on the GPU at hand: each candidate form timed inside a CUDA graph (as the decode step
replays it) per batch size, and kept only where its output matches a reference. Used for the decode step's
cross- and self-attention (cross_attention.py, engine.py) and the one-row projections (gemv.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger("llamactl.server.engine")


def time_in_graph(fn: Callable[[], torch.Tensor], calls: int = 8, reps: int = 3) -> float:
    """Seconds per call of ``fn`` replayed from a CUDA graph (no launch overhead, as in the decode step)."""
    side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000 / calls)
    return float(sorted(times)[len(times) // 2])


def choose_fastest(forms: dict[str, Callable[[int], Callable[[], torch.Tensor]]], batches: list[int],
                   timer: Callable[[Callable[[], torch.Tensor]], float] | None = None, tolerance: float = 2e-2,
                   reference: Callable[[int], Callable[[], torch.Tensor]] | None = None,
                   fallback: str | None = None) -> tuple[dict[int, str], dict[str, list[float]]]:
    """Per batch size, the fastest of ``forms`` (name -> rows -> a call) whose output is within ``tolerance``
    (relative L2) of ``reference``'s (default: the first form); a form that raises is left out. Where none is
    left, ``fallback`` (default: the first form's name) for every batch."""
    first = next(iter(forms))
    reference = reference or forms[first]
    timings: dict[str, list[float]] = {}
    for name, at in forms.items():
        try:
            per_batch = []
            for b in batches:
                ref = reference(b)().float()
                run = at(b)
                got = run().float()
                if relative_l2(got, ref) > tolerance:
                    raise ValueError(f"{name} differs from the reference")
                per_batch.append((timer or time_in_graph)(run))
            timings[name] = per_batch
        except Exception as exc:  # noqa: BLE001 - a kernel that cannot compile, take the shapes or be captured
            log.info("kernel form %s left out: %s", name, exc)
    if not timings:
        return {b: fallback or first for b in batches}, timings
    return {b: min(timings, key=lambda n: timings[n][i]) for i, b in enumerate(batches)}, timings


def relative_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want||: how far a candidate kernel's output is from the reference's."""
    return float(torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want).clamp(min=1e-30))


def describe_choice(choice: dict[int, str], timings: dict[str, list[float]], batches: list[int],
                    digits: int = 0) -> str:
    """A per-batch choice and its timings for /health: "batch 1+: a, batch 8+: b (a 12 / 30 us; b ... at [1, 8])"."""
    chosen = ", ".join(f"batch {b}+: {name}" for b, name in sorted(choice.items()))
    timed = "; ".join(f"{name} {' / '.join(f'{t * 1e6:.{digits}f}' for t in ts)} us" for name, ts in timings.items())
    return f"{chosen} ({timed} at {batches})"


def for_rows(choice: dict[int, str], rows: int) -> str:
    """The form for a step of ``rows`` rows: that of the largest measured batch not above it (the smallest's
    below it)."""
    measured = sorted(choice)
    below = [b for b in measured if b <= rows]
    return choice[below[-1] if below else measured[0]]
