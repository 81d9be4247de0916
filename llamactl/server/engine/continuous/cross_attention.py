"""The decode step's cross-attention kernel, chosen by timing at start (CUDA).

A decode step's cross-attention reads every row's image K/V (6,404 positions x 8 K/V heads per layer: ~210 MB a
row over the 8 layers), so at batch 32 it is ~6.7 GB a step, and at batch 1 the grouped matmuls of ``fused.attend``
ran at a fraction of the bandwidth (an H100 profile: 58 us for the scores of one layer, where the bytes need ~5 us).
The same math has other forms whose speed depends on the GPU and library versions, so each is timed at start on the
engine's own pools, inside CUDA graphs as the step runs it, and checked against ``attend``:
- ``matmul``: ``fused.attend`` (q grouped under its K/V head, scores = q @ K^T, softmax, @ V);
- ``keys_first``: scores^T = K @ q^T (the GEMM streams K along its contiguous rows);
- ``sdpa_efficient`` / ``sdpa_cudnn``: PyTorch's fused attention with the additive mask, the 4 query heads of a
  K/V head passed as 4 query rows of one head (exactly GQA for one token), so K/V are read once, not repeated;
- ``triton`` (where Triton runs): ``decode_attention.cross_attention``, the positions split across programs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from llamactl.server.engine.continuous import decode_attention
from llamactl.server.engine.continuous.fused import attend
from llamactl.server.engine.continuous.kernel_choice import choose_fastest

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def keys_first(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """As ``attend``; q [n, heads, t, d], k/v [n, kv_heads, L, d], bias [n, 1, t, L] -> [n, heads, t, d]."""
    n, heads, t, d = q.shape
    kv = k.shape[1]
    group = heads // kv
    qg = q.reshape(n, kv, group * t, d)
    scores = torch.matmul(k, qg.transpose(-1, -2)).transpose(-1, -2).reshape(n, kv, group, t, -1)
    scores = torch.add(bias.unsqueeze(1), scores, alpha=scale)
    weights = F.softmax(scores, dim=-1)
    return torch.matmul(weights.view(n, kv, group * t, -1), v).view(n, heads, t, d)


def fused_sdpa(backend: SDPBackend | None) -> Attend:
    """PyTorch's fused attention on grouped queries (one decode token: ``t`` == 1), with one kernel family."""

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
        n, heads, t, d = q.shape
        if t != 1:
            raise ValueError("grouped fused attention is for one query token a row")
        kv = k.shape[1]
        qg = q.reshape(n, kv, heads // kv, d)  # a K/V head's query heads as its query rows
        if backend is None:
            out = F.scaled_dot_product_attention(qg, k, v, attn_mask=bias, scale=scale)
        else:
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(qg, k, v, attn_mask=bias, scale=scale)
        return out.reshape(n, heads, 1, d)

    return run


CANDIDATES: dict[str, Attend] = {
    "matmul": attend,
    "keys_first": keys_first,
    "sdpa_efficient": fused_sdpa(SDPBackend.EFFICIENT_ATTENTION),
    "sdpa_cudnn": fused_sdpa(SDPBackend.CUDNN_ATTENTION),
}
if decode_attention.available():  # image positions split across every SM (flash-decoding)
    CANDIDATES["triton"] = decode_attention.cross_attention


def choose(q_at: Callable[[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]], batches: list[int],
           scale: float, timer: Callable[[Callable[[], torch.Tensor]], float] | None = None,
           tolerance: float = 2e-2, skip: tuple[str, ...] = ()) -> tuple[dict[int, str], dict[str, list[float]]]:
    """The fastest candidate at each of ``batches`` (leaving out those named in ``skip``); ``q_at(b)`` gives
    (q, k, v, bias) for b rows.

    Per batch, because the forms cross over: on an H100 (bench/results/engine_bench_run9.json) the matmuls took
    66 us at batch 1 and 479 us at batch 32, cuDNN's fused attention 135 and 302 us. A candidate that fails (a
    kernel that cannot take the shapes, a capture error) or whose output is further than ``tolerance`` (relative
    L2) from ``matmul`` is left out. Returns {batch: name} and the seconds per candidate (one per batch).
    """

    def form(fn: Attend) -> Callable[[int], Callable[[], torch.Tensor]]:
        def at(b: int) -> Callable[[], torch.Tensor]:
            q, k, v, bias = q_at(b)
            return lambda: fn(q, k, v, bias, scale)

        return at

    forms = {name: form(fn) for name, fn in CANDIDATES.items() if name not in skip}
    return choose_fastest(forms, batches, timer, tolerance,
                          reference=form(attend), fallback="matmul")
