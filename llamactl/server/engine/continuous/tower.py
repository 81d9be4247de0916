"""The vision tower's encoder layers in fewer passes over memory: transformers' arithmetic, regrouped.

Why: on an H200 the tower's 8 four-tile images took 363 ms of kernels, 46 ms of them element-wise (GELU 15, layer
norms 13, residual additions 7, a concatenation 4.5; bench/results/engine.md, Session 6). Each of those reads
and writes activations of 51,456 rows x 1,280 (or 5,120 for GELU) once more. Here, per encoder layer:
- q/k/v as one GEMM (the modules' weights become views of one tensor, as fused.py does for the text layers);
- fc1's bias and GELU inside the GEMM on GPUs (cuBLASLt's GELU epilogue, ``torch._addmm_activation``). That
  epilogue is the tanh form of GELU; the checkpoint's is the erf form. The two differ by < 5e-4 (absolute,
  largest near |x| = 2), well under bf16's rounding of the result (3.9e-3 at 1.0), so it is used only in 16-bit
  dtypes: float32 (the CPU, CI) keeps the erf form and equals transformers;
- the residual addition (with the global layers' tanh gate) and the next layer norm as one pass
  (``residual_norm_``: a Triton kernel on GPUs, PyTorch ops elsewhere), the residual stream updated in place;
- the five kept intermediate states copied into column blocks of the output as they are reached, where
  transformers interleaves them column by column (a strided copy) and copies them again to drop the padding
  rows; the projector's weight columns are reordered once to match (``column_order``), and it runs on the padding
  rows too (0.4 % of the rows, dropped from its 4,096-wide output).
Before the encoder, the patch convolution runs as one GEMM over row-major patches; the other embeddings and the
attention (vision.py's split mask) are transformers' own modules. Measured (bench/results/engine.md, Sessions 10
and 11; H200, 8 four-tile images): 378 -> 350 ms a tower, element-wise kernels 45 -> 19 ms; 344 ms with the kept
states in blocks. What is left is ~60 % attention (cuDNN's fastest plan at head dim 80) and ~36 % GEMMs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from llamactl.server.engine.continuous.fused import concat_into_views

try:  # triton ships with CUDA builds of torch; CPU installs run without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None

_ROWS_PER_PROGRAM = 4


@dataclass
class TowerLayer:
    qkv: torch.Tensor  # [3 * hidden, hidden], q/k/v modules' weights are views of it
    o: torch.Tensor
    fc1: Any  # nn.Linear (weight, bias)
    fc2: Any
    ln_in: Any  # nn.LayerNorm
    ln_post: Any
    gate_attn: float  # tanh of the layer's gate (1.0 for ungated layers), as transformers rounds it
    gate_ffn: float
    heads: int
    head_dim: int
    scaling: float


def tower_layer(layer: Any) -> TowerLayer:
    attn = layer.self_attn

    def gate(p: Any) -> float:
        return float(p.detach().tanh().item()) if layer.is_gated else 1.0

    return TowerLayer(
        qkv=concat_into_views([attn.q_proj, attn.k_proj, attn.v_proj]), o=attn.o_proj.weight,
        fc1=layer.mlp.fc1, fc2=layer.mlp.fc2, ln_in=layer.input_layernorm, ln_post=layer.post_attention_layernorm,
        gate_attn=gate(getattr(layer, "gate_attn", None)), gate_ffn=gate(getattr(layer, "gate_ffn", None)),
        heads=int(attn.num_heads), head_dim=int(attn.head_dim), scaling=float(attn.scaling),
    )


def layer_norm(norm: Any, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def kernel_available() -> bool:
    return triton is not None and torch.cuda.is_available()


def residual_norm_(h: torch.Tensor, y: torch.Tensor, gate: float, norm: Any, use_kernel: bool) -> torch.Tensor:
    """h += gate * y (in place; h is the residual stream), then return ``norm``(h). h, y [rows, hidden]."""
    if not use_kernel:
        if gate == 1.0:
            h.add_(y)
        else:
            h.add_(y * gate)  # transformers rounds the gated output before the addition
        return layer_norm(norm, h)
    rows, hidden = h.shape
    out = torch.empty_like(h)
    grid = (triton.cdiv(rows, _ROWS_PER_PROGRAM),)
    _residual_norm_kernel[grid](
        h, y, norm.weight, norm.bias, out, rows, gate, float(norm.eps),
        HIDDEN=hidden, BLOCK=triton.next_power_of_2(hidden), ROWS=_ROWS_PER_PROGRAM, num_warps=4,
    )
    return out


def mlp_up(fc1: Any, x: torch.Tensor, epilogue: bool) -> torch.Tensor:
    """GELU(x @ fc1.weight.T + fc1.bias); in one GEMM (tanh GELU) when ``epilogue``."""
    if epilogue:
        return torch._addmm_activation(fc1.bias, x, fc1.weight.t(), use_gelu=True)
    return F.gelu(F.linear(x, fc1.weight, fc1.bias))


class FusedTower:
    """transformers' ``MllamaVisionModel.forward`` with the encoder layers above: pixel values -> the states its
    ``last_hidden_state`` holds [n, media, tiles, patches, hidden * (1 + kept layers)], here with each tile's
    padding rows still in (``padded`` rows a tile) and the columns in the order ``column_order`` gives, and
    ``patches``."""

    def __init__(self, vision: Any, attention: Any) -> None:
        """``attention(module, q, k, v, mask, scaling=...)`` -> ([n, L, heads, d], None), transformers' attention
        function signature (vision.py's split mask)."""
        self.vision = vision
        self.attention = attention
        self.triton = True  # the residual + norm pass by the Triton kernel on GPUs (settings.triton_kernels)
        self.local = [tower_layer(layer) for layer in vision.transformer.layers]
        self.global_ = [tower_layer(layer) for layer in vision.global_transformer.layers]
        self.kept = [int(i) for i in vision.intermediate_layers_indices]

    def __call__(self, pixel: torch.Tensor, ar_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        vision = self.vision
        fast = pixel.is_cuda and vision.patch_embedding.weight.dtype in (torch.float16, torch.bfloat16)
        kernel = fast and self.triton and kernel_available()
        n, media, tiles = pixel.shape[:3]
        h, patches, padded = self._embed(pixel, ar_ids)  # [n * media, tiles * padded, dim]
        images, length, dim = h.shape
        h = h.reshape(images * length, dim).contiguous()
        # the output in blocks of ``dim`` columns: the final stream, then each kept state as it is reached
        out = h.new_empty(images * length, dim * (1 + len(self.kept)))
        normed = layer_norm(self.local[0].ln_in, h)
        for i, layer in enumerate(self.local):
            after = self.local[i + 1].ln_in if i + 1 < len(self.local) else vision.layernorm_post
            normed = self._layer(layer, h, normed, after, images, fast, kernel)
            for block in (1 + k for k, j in enumerate(self.kept) if j == i):
                out[:, block * dim : (block + 1) * dim].copy_(h)
        # layernorm_post's output replaces the stream; the tile embeddings go on top of it
        h = vision.post_tile_positional_embedding(normed.view(images, tiles, padded, dim), ar_ids.reshape(images, -1))
        h = h.reshape(images * length, dim).contiguous()
        normed = layer_norm(self.global_[0].ln_in, h)
        for i, layer in enumerate(self.global_):
            after = self.global_[i + 1].ln_in if i + 1 < len(self.global_) else None
            normed = self._layer(layer, h, normed, after, images, fast, kernel)
        out[:, :dim].copy_(h)
        return out.view(n, media, tiles, padded, -1), patches

    def column_order(self) -> torch.Tensor:
        """For each column of this tower's output, the column of transformers' ``last_hidden_state`` that holds
        the same value. transformers interleaves the kept states (``torch.stack(..., dim=-1)``: column
        ``dim + d * kept + k``), which costs a strided copy of every kept state (4.5 ms of a 350 ms tower for 8
        images on an H200); this tower writes them in blocks, and the projector's weight columns are reordered
        once to match (``weight[:, column_order()]``)."""
        dim = self.local[0].o.shape[0]
        kept = len(self.kept)
        blocks = [torch.arange(dim)] + [dim + torch.arange(dim) * kept + k for k in range(kept)]
        return torch.cat(blocks)

    def _layer(self, w: TowerLayer, h: torch.Tensor, normed: torch.Tensor, after: Any, images: int, fast: bool,
               kernel: bool) -> torch.Tensor:
        """One encoder layer on the stream ``h`` [rows, dim] (updated in place) given ``normed`` = its input
        norm of h; returns ``after``(h) for the next layer (or None where nothing follows)."""
        rows, dim = h.shape
        length = rows // images
        qkv = F.linear(normed, w.qkv).view(images, length, 3, w.heads, w.head_dim)
        q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))
        attn, _ = self.attention(None, q, k, v, None, scaling=w.scaling)
        y = F.linear(attn.reshape(rows, dim), w.o)
        normed = residual_norm_(h, y, w.gate_attn, w.ln_post, kernel)
        y = F.linear(mlp_up(w.fc1, normed, fast), w.fc2.weight, w.fc2.bias)
        if after is None:
            h.add_(y if w.gate_ffn == 1.0 else y * w.gate_ffn)
            return h
        return residual_norm_(h, y, w.gate_ffn, after, kernel)

    def _embed(self, pixel: torch.Tensor, ar_ids: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """transformers' steps before the encoder: patches, tile and position embeddings, class token, the pre
        norm, padding to a multiple of 8 rows per tile. -> ([images, tiles * padded, dim], patches, padded)."""
        vision = self.vision
        n, media, tiles, channels, height, width = pixel.shape
        images = n * media
        weight = vision.patch_embedding.weight  # [dim, channels, p, p], stride p, no padding, no bias
        dim, p = weight.shape[0], weight.shape[-1]
        rows, cols = height // p, width // p
        pixel = pixel.reshape(images * tiles, channels, height, width)[:, :, : rows * p, : cols * p]
        # the convolution as one GEMM over the patches laid out row by row (cuDNN's implicit-GEMM convolution took
        # 4 ms for 8 images on an H200, this GEMM 0.5 ms)
        patch_rows = (pixel.reshape(images * tiles, channels, rows, p, cols, p).permute(0, 2, 4, 1, 3, 5)
                      .reshape(images * tiles, rows * cols, channels * p * p).to(weight.device, weight.dtype))
        h = F.linear(patch_rows, weight.reshape(dim, -1))
        ar_ids = ar_ids.reshape(images, -1)
        patches = rows * cols
        h = vision.pre_tile_positional_embedding(h.reshape(images, tiles, -1, dim), ar_ids)
        h = vision.apply_class_embedding(h.reshape(images * tiles, patches, dim))
        patches += 1
        h = vision.gated_positional_embedding(h.reshape(images, tiles, patches, dim), ar_ids)
        h = vision.layernorm_pre(h)
        pad = (8 - patches % 8) % 8
        h = F.pad(h, (0, 0, 0, pad))
        return h.reshape(images, tiles * (patches + pad), dim), patches, patches + pad


if triton is not None:

    @triton.jit  # type: ignore[untyped-decorator]
    def _residual_norm_kernel(  # type: ignore[no-untyped-def]
        h_ptr, y_ptr, w_ptr, b_ptr, out_ptr, rows, gate, eps, HIDDEN: tl.constexpr, BLOCK: tl.constexpr,
        ROWS: tl.constexpr,
    ):
        """ROWS rows per program: h += gate * y (rounded to h's dtype, as transformers stores the stream), then
        the layer norm of that stored value into out, statistics in float32."""
        cols = tl.arange(0, BLOCK)
        in_row = cols < HIDDEN
        weight = tl.load(w_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        bias = tl.load(b_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        for r in tl.static_range(ROWS):
            row = tl.program_id(0) * ROWS + r
            mask = in_row & (row < rows)
            offsets = row.to(tl.int64) * HIDDEN + cols
            h = tl.load(h_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            stored = (h + gate * y).to(h_ptr.dtype.element_ty)
            tl.store(h_ptr + offsets, stored, mask=mask)
            x = stored.to(tl.float32)
            mean = tl.sum(x, axis=0) / HIDDEN
            centred = tl.where(in_row, x - mean, 0.0)
            var = tl.sum(centred * centred, axis=0) / HIDDEN
            normed = centred * tl.rsqrt(var + eps) * weight + bias
            tl.store(out_ptr + offsets, normed.to(out_ptr.dtype.element_ty), mask=mask)
