"""CUDA graphs of the decode step, one per (batch bucket, length bucket), captured on first use.

A decode step of the 11B model is ~40 layers x ~15 small kernels; launched one by one from Python that is
40-120 ms of CPU time for ~10 ms of GPU work (gpu-baseline.md). Replaying a captured graph launches them all
at once. Shapes are static per graph: rows are padded up to a batch bucket (padding rows use free slots), and
self-attention K/V are read up to a length bucket (masked beyond each row's length).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

DecodeFn = Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor]


def batch_buckets(max_rows: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 64, then every 16: padding costs at most a few rows of reads."""
    sizes = [1, 2, 4, 8] + list(range(16, 65, 8)) + list(range(80, max(max_rows, 80) + 16, 16))
    out = sorted({s for s in sizes if s < max_rows} | {max_rows})
    return out


def length_buckets(max_len: int) -> list[int]:
    sizes = []
    n = 128
    while n < max_len:
        sizes.append(n)
        n *= 2
    return sizes + [max_len]


def bucket(value: int, buckets: list[int]) -> int:
    for b in buckets:
        if value <= b:
            return b
    raise ValueError(f"{value} is beyond the largest bucket {buckets[-1]}")


class DecodeGraphs:
    def __init__(
        self, decode: DecodeFn, max_rows: int, device: str, small: DecodeFn | None = None, small_rows: int = 0,
        capture_stream: torch.cuda.Stream | None = None,
    ) -> None:
        """``small`` (if given) replaces ``decode`` for batches of at most ``small_rows`` rows. ``capture_stream``:
        where the graphs are captured, whose priority their kernels keep wherever they are replayed (None:
        torch.cuda.graph's default capture stream, priority 0)."""
        self.decode = decode
        self.capture_stream = capture_stream
        self.small, self.small_rows = small, small_rows
        self.tokens = torch.zeros(max_rows, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_rows, dtype=torch.long, device=device)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle()
        self.captures = 0

    def run(self, rows: int, length: int) -> torch.Tensor:
        """Replay (capturing first if new) the step for ``rows`` x ``length``; inputs are in the buffers."""
        key = (rows, length)
        if key not in self._graphs:
            self._graphs[key] = self._capture(rows, length)
        graph, out = self._graphs[key]
        graph.replay()
        return out

    def _capture(self, rows: int, length: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        decode = self.small if self.small is not None and rows <= self.small_rows else self.decode
        # Warm-up runs on a side stream (library handles, autotuning) do the very step we are about to replay:
        # they write the same K/V at the same positions, so running it again is harmless.
        side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                decode(self.tokens[:rows], self.positions[:rows], rows, length)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, stream=self.capture_stream):
            out = decode(self.tokens[:rows], self.positions[:rows], rows, length)
        self.captures += 1
        return graph, out
