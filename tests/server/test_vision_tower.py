"""tower.py's pieces: the residual + layer norm pass (PyTorch form here, the Triton kernel in its interpreter where
Triton is installed; not in CI's CPU install). The whole tower against transformers: test_vision_split_mask.py."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from llamactl.server.engine.continuous.tower import residual_norm_

from ._support import run_in_triton_interpreter


def test_residual_norm_updates_the_stream_in_place_and_returns_the_next_norm() -> None:
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(48, eps=1e-5)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    for gate in (1.0, 0.6):
        h, y = torch.randn(7, 48), torch.randn(7, 48)
        want_h = h + gate * y
        got = residual_norm_(h, y, gate, norm, use_kernel=False)
        assert torch.allclose(h, want_h)
        assert torch.allclose(got, F.layer_norm(want_h, (48,), norm.weight, norm.bias, 1e-5), atol=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed (CPU install)")
def test_residual_norm_kernel_in_triton_interpreter() -> None:
    """float32 and float16 (the interpreter truncates float32 -> bfloat16 where GPUs round to nearest, so bf16
    is checked on the GPU: bench/engine_tower_probe.py)."""
    code = """
import torch
import torch.nn.functional as F
from llamactl.server.engine.continuous.tower import residual_norm_
torch.manual_seed(0)
for hidden in (48, 1280):
    norm = torch.nn.LayerNorm(hidden, eps=1e-5)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 5e-3)):
        for rows in (1, 4, 9):
            for gate in (1.0, 0.6):
                h, y = torch.randn(rows, hidden).to(dtype), torch.randn(rows, hidden).to(dtype)
                want_h = (h.float() + gate * y.float()).to(dtype)
                want = F.layer_norm(want_h.float(), (hidden,), norm.weight, norm.bias, 1e-5)
                got = residual_norm_(h, y, gate, norm.to(dtype), use_kernel=True)
                norm.float()
                assert torch.equal(h, want_h), (hidden, dtype, rows, gate)
                assert got.dtype == dtype
                assert torch.allclose(got.float(), want, atol=tol, rtol=tol), (hidden, dtype, rows, gate)
print("ok")
"""
    run_in_triton_interpreter(code)
