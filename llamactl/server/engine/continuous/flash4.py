"""FlashAttention 4's CuTe DSL kernels (the optional ``flash-attn-4`` package) for the vision tower's unmasked
attention pass, where they are installed; vision.py times them at start against PyTorch's SDPA kernels.

At the tower's shapes (16 heads, head dim 80, 6,432 positions per four-tile image) FA4's Hopper kernel reads q/k/v
as the q/k/v GEMM lays them out and writes [n, L, heads, d], the layout the output projection reads, so the
transposed copy after SDPA goes too. One NVIDIA H200, one layer for 8 images: 2.85 ms (595 TFLOP/s) against
cuDNN's 4.41 ms with that copy (385 TFLOP/s); the whole tower 345 -> 281 ms for 8 images, 91 -> 77 ms for 2, at
the same distance from the float32 tower (bench/results/engine_vision_fa4_probe_run1_h200.json). The kernels are
compiled at their first call (~1.5 s each shape family), which the start's timing pays.
"""

from __future__ import annotations

import importlib.util

import torch


def available(device: torch.device | str) -> bool:
    """Whether the package is installed and the device is a CUDA GPU (whether the kernel compiles and runs there
    is found out by running it: vision.choose_backend)."""
    return torch.device(device).type == "cuda" and importlib.util.find_spec("flash_attn") is not None and (
        importlib.util.find_spec("flash_attn.cute") is not None)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Attention without a mask over [n, L, heads, d] q/k/v (the last dimension contiguous) -> [n, L, heads, d]."""
    from flash_attn.cute import flash_attn_func

    return flash_attn_func(q, k, v, softmax_scale=scale)[0]  # type: ignore[no-any-return]
