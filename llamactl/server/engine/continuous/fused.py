"""Fewer, larger kernels for the text layers: the same arithmetic as transformers' modules, grouped.

A decode step is bound by the weight reads (~6 ms at batch 1 on an H100) plus ~2,000 small kernels of ~2-3 us
each when every module runs as written (bench/results/engine_probe_run1.json: 10.9 ms of GPU time at batch 1).
What this module groups, each without copying a weight:
- q/k/v projections as one GEMM and gate/up as one GEMM: the modules' weights become views of one concatenated
  tensor, so transformers' own modules (and their state dict) still see their weights;
- RMSNorm as one fused kernel (``F.rms_norm``; transformers runs it as ~7 element-wise kernels);
- rotary embedding on q and k together in three kernels (``rotate_half(x) * sin`` == ``roll(x) * signed sin``
  because the checkpoint's tables repeat each frequency in both halves);
- residual additions inside the GEMM (``addmm_``) or as one ``addcmul_`` with the cross-attention gates;
- attention scores scaled and masked in one ``add`` and a softmax in the model's dtype (it accumulates in
  float32 either way).
Numerics: float32 on the CPU gives the same greedy tokens as ``generate`` (CI); bf16 differs from transformers by
rounding order only (bench/results/engine.md states the tolerance).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class SelfWeights:
    qkv: torch.Tensor  # [(heads + 2 kv_heads) * head_dim, hidden]
    o: torch.Tensor
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    down: torch.Tensor
    ln_in: Any  # RMSNorm modules (weight, variance_epsilon)
    ln_post: Any


@dataclass
class CrossWeights:
    q: torch.Tensor
    o: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor
    ln_in: Any
    ln_post: Any
    q_norm: Any
    attn_gate: torch.Tensor  # tanh of the layer's gates, computed once
    mlp_gate: torch.Tensor


def concat_into_views(linears: list[Any]) -> torch.Tensor:
    """One weight for several bias-free projections of the same input; each module's weight becomes a view of it."""
    for lin in linears:
        if getattr(lin, "bias", None) is not None:
            raise ValueError("fused projections expect bias-free linear layers")
    fused = torch.cat([lin.weight.data for lin in linears])
    start = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight.data = fused[start : start + rows]
        start += rows
    return fused


def self_weights(layer: Any) -> SelfWeights:
    attn, mlp = layer.self_attn, layer.mlp
    return SelfWeights(
        qkv=concat_into_views([attn.q_proj, attn.k_proj, attn.v_proj]),
        o=attn.o_proj.weight,
        gate_up=concat_into_views([mlp.gate_proj, mlp.up_proj]),
        down=mlp.down_proj.weight,
        ln_in=layer.input_layernorm,
        ln_post=layer.post_attention_layernorm,
    )


def cross_weights(layer: Any) -> CrossWeights:
    ca, mlp = layer.cross_attn, layer.mlp
    return CrossWeights(
        q=ca.q_proj.weight,
        o=ca.o_proj.weight,
        gate_up=concat_into_views([mlp.gate_proj, mlp.up_proj]),
        down=mlp.down_proj.weight,
        ln_in=layer.input_layernorm,
        ln_post=layer.post_attention_layernorm,
        q_norm=ca.q_norm,
        attn_gate=layer.cross_attn_attn_gate.detach().tanh(),
        mlp_gate=layer.cross_attn_mlp_gate.detach().tanh(),
    )


def rms(norm: Any, x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)


def signed_sin(sin: torch.Tensor) -> torch.Tensor | None:
    """The sine table with its first half negated, or None when the halves differ (then use ``rotate_half``)."""
    half = sin.shape[-1] // 2
    if not torch.equal(sin[..., :half], sin[..., half:]):
        return None
    out = sin.clone()
    out[..., :half] = -out[..., :half]
    return out


def rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x [..., heads, head_dim]; cos/sin broadcastable: x * cos + rotate_half(x) * sin in three kernels."""
    half = x.shape[-1] // 2
    return (x * cos).addcmul_(torch.roll(x, half, dims=-1), sin_signed)


def mlp(w: SelfWeights | CrossWeights, x: torch.Tensor,
        linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.linear) -> torch.Tensor:
    """SiLU-gated MLP with one GEMM for gate and up; returns the pre-down activation [..., intermediate]."""
    gate, up = linear(x, w.gate_up).chunk(2, dim=-1)
    return F.silu(gate) * up


def add_linear_(h: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """h += x @ weight.T in one GEMM (h is the residual stream, updated in place)."""
    h.view(-1, h.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]), weight.t())
    return h


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """Grouped-query attention without repeating K/V in memory.

    q [n, heads, t, d]; k/v [n, kv_heads, L, d]; bias [n, 1, t, L] -> [n, heads, t, d]. Query heads are grouped
    under the K/V head they share, so each K/V element is read once per step (decode is bandwidth-bound).
    """
    n, heads, t, d = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    qg = q.reshape(n, kv_heads, group * t, d)
    scores = torch.matmul(qg, k.transpose(-1, -2)).view(n, kv_heads, group, t, -1)
    scores = torch.add(bias.unsqueeze(1), scores, alpha=scale)  # scale and mask in one kernel
    weights = F.softmax(scores, dim=-1)
    out = torch.matmul(weights.view(n, kv_heads, group * t, -1), v)
    return out.view(n, heads, t, d)


def rope_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' form (``rotate_half``), for tables whose halves differ."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
