"""Decode-step attention kernels on this GPU: the engine's grouped matmuls against other forms of the same math.

Shapes of the 11B model's decode step (32 query heads, 8 K/V heads, head dim 128): cross-attention over 6,404
image positions and self-attention over a 256-token bucket, at batch 1, 8, 32, 64. Forms timed (bf16):
- ``grouped``: fused.attend as the engine runs it (q grouped under its K/V head, scores = q @ K^T);
- ``keys_first``: scores^T = K @ q^T (the GEMM streams K along its contiguous rows), softmax over the keys;
- ``sdpa_mask``: F.scaled_dot_product_attention with the bias as mask (K/V repeated per query head).
Each form's output is checked against ``grouped``. Prints JSON; ~10 s.

    python3 bench/engine_attn_probe.py --out $OUT/engine_attn_probe.json      # GPU only
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch
import torch.nn.functional as F

from llamactl.server.engine.continuous.fused import attend


def keys_first(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    n, heads, t, d = q.shape
    kv = k.shape[1]
    qg = q.reshape(n, kv, heads // kv * t, d)
    scores_t = torch.matmul(k, qg.transpose(-1, -2))  # [n, kv, L, g*t]
    scores = torch.add(bias.unsqueeze(1), scores_t.transpose(-1, -2).reshape(n, kv, heads // kv, t, -1), alpha=scale)
    weights = F.softmax(scores, dim=-1)
    return torch.matmul(weights.view(n, kv, heads // kv * t, -1), v).view(n, heads, t, d)


def sdpa_mask(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    g = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=bias,
                                          scale=scale)


def timed(fn: Any, reps: int = 50) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    torch.cuda.synchronize()
    return round(a.elapsed_time(b) / reps * 1000, 1)  # microseconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "unit": "us"}
    dt = torch.bfloat16
    for kind, length, cap in (("cross", 6404, 6404), ("self", 256, 3072)):
        for b in (1, 8, 32, 64):
            q = torch.randn(b, 32, 1, 128, device="cuda", dtype=dt)
            k_full = torch.randn(b, 8, cap, 128, device="cuda", dtype=dt)
            v_full = torch.randn(b, 8, cap, 128, device="cuda", dtype=dt)
            k, v = k_full[:, :, :length], v_full[:, :, :length]
            bias = torch.zeros(b, 1, 1, length, device="cuda", dtype=dt)
            bias[:, :, :, length - 100:] = torch.finfo(dt).min
            scale = 128**-0.5
            ref = attend(q, k, v, bias, scale).float()
            row: dict[str, Any] = {}
            for name, fn in (("grouped", attend), ("keys_first", keys_first), ("sdpa_mask", sdpa_mask)):
                try:
                    out = fn(q, k, v, bias, scale).float()
                    err = float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref))
                    row[name] = {"us": timed(lambda fn=fn, q=q, k=k, v=v, bias=bias, scale=scale: fn(q, k, v, bias, scale)),
                                 "rel_l2": round(err, 5)}
                except RuntimeError as exc:
                    row[name] = str(exc)[:100]
            report[f"{kind}_b{b}"] = row
            print(kind, b, row, flush=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
