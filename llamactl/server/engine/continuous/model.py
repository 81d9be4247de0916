"""The forward passes of the continuous engine, over transformers' own Mllama modules and weights.

Only the orchestration and the grouping of kernels are ours: which rows, which memory, which masks, and
``fused.py``'s fewer, larger kernels over the checkpoint's own weights (q/k/v and gate/up as one GEMM each, fused
norms and rotary, residuals inside the GEMMs), with the same arithmetic as transformers' modules, so a float32
greedy answer equals ``generate``'s. What differs from ``generate``:
- self-attention K/V live in pre-allocated per-slot memory (``pools.SlotPools``) and are written in place;
- cross-attention K/V are computed once per image (``encode_images``) and kept in the slot while it decodes;
- a decode step covers slots ``0..B-1`` (the scheduler keeps running sequences packed at the front) and reads
  self-attention K/V only up to a length bucket, so its shapes are static and CUDA graphs can replay it;
- rows without an image pass the cross-attention layers unchanged (a per-row 0/1 factor on both residual
  branches), which is what ``generate`` does by skipping those layers for a text-only request.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from llamactl.server.engine.continuous import fp8
from llamactl.server.engine.continuous.cross_attention import CANDIDATES as CROSS_FORMS
from llamactl.server.engine.continuous.cross_attention import Attend
from llamactl.server.engine.continuous.decode_attention import self_attention
from llamactl.server.engine.continuous.fused import (
    CrossWeights,
    SelfWeights,
    attend,
    cross_weights,
    mlp,
    rms,
    rope,
    rope_halves,
    self_weights,
    signed_sin,
)
from llamactl.server.engine.continuous.gemv import Projections
from llamactl.server.engine.continuous.kernel_choice import for_rows
from llamactl.server.engine.continuous.pools import SlotPools
from llamactl.server.engine.continuous.tower_graphs import TowerGraphs
from llamactl.server.engine.continuous.vision import VisionEncoder, to_device


@dataclass
class SelfStep:
    """Per decode step, shared by its self-attention layers (PyTorch form)."""

    cos: torch.Tensor  # [b, 1, head_dim] rotary rows at the positions
    sin: torch.Tensor
    write_at: torch.Tensor  # [b, kv_heads, 1, head_dim] index of each row's new K/V
    bias: torch.Tensor  # [b, 1, 1, lb] 0 for keys up to the position, dtype min beyond
    lb: int


@dataclass
class Newcomer:
    """One sequence to prefill: its slot, prompt ids and (optionally) its image's processor tensors."""

    slot: int
    input_ids: list[int]
    cross_mask: torch.Tensor | None  # [prompt_len, max_tiles] 0/1 (the processor's cross_attention_mask)
    pixel_values: torch.Tensor | None  # [1, 1, tiles, 3, px, px]
    aspect_ratio_ids: torch.Tensor | None
    aspect_ratio_mask: torch.Tensor | None


class MllamaRunner:
    def __init__(self, model: Any, pools: SlotPools, encoder: VisionEncoder,
                 fp8_copies: fp8.TextCopies | None = None) -> None:
        """``fp8_copies`` (``fp8.quantize_text``): the text layers and the LM head multiply by these FP8 copies, in
        the decode step and the prefill alike."""
        inner = model.model
        text = inner.language_model
        self.encoder = encoder
        self.tower_graphs: TowerGraphs | None = None  # the tower as CUDA graphs (set by the engine on GPUs)
        self.embed = text.embed_tokens
        self.layers = text.layers
        self.norm = text.norm
        self.lm_head = model.lm_head
        cfg = text.config
        self.cross_layers = set(cfg.cross_attention_layers)
        self.nh = cfg.num_attention_heads
        self.nkv = cfg.num_key_value_heads
        self.hd = cfg.hidden_size // self.nh
        self.group = self.nh // self.nkv
        self.scale = self.hd**-0.5
        self.num_patches = int(inner.vision_model.num_patches)
        self.pools = pools
        self.dtype = pools.dtype
        self.min_value = torch.finfo(self.dtype).min
        # Rotary tables for every position a slot can hold, computed by the checkpoint's own rotary module.
        positions = torch.arange(pools.max_len, device=pools.device)[None]
        probe = torch.zeros(1, dtype=self.dtype, device=pools.device)
        cos, sin = text.rotary_emb(probe, position_ids=positions)
        self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()  # [max_len, head_dim]
        self.sin_signed = signed_sin(self.sin)
        self._sin_table = self.sin if self.sin_signed is None else self.sin_signed
        self._arange = torch.arange(pools.max_len, device=pools.device)
        if cfg.hidden_act != "silu":
            raise ValueError(f"the continuous engine expects SiLU MLPs, not {cfg.hidden_act!r}")
        # the decode step's cross-attention form per batch size (cross_attention.py times them on GPUs)
        self.cross_choice: dict[int, str] = {1: "matmul"}
        # the decode step's self-attention per batch size: "torch" ops or the "triton" kernel (timed on GPUs)
        self.self_choice: dict[int, str] = {1: "torch"}
        # the projections: with bf16 weights, one-row ones through Triton where gemv.py chose it on GPUs, the rest
        # cuBLAS; with FP8 copies, fp8.py's kernel (or its float32 reference off the GPU)
        self.proj: Projections | fp8.Fp8Projections
        self.head: torch.Tensor | fp8.QuantWeight | None = None  # a bias-free LM head's weight (else the module)
        if fp8_copies is None:
            self.proj = Projections()
            self.weights: list[SelfWeights | CrossWeights] = [
                cross_weights(layer) if i in self.cross_layers else self_weights(layer)
                for i, layer in enumerate(self.layers)
            ]
            if getattr(self.lm_head, "bias", None) is None:
                self.head = self.lm_head.weight
        else:
            self.proj = fp8.Fp8Projections(use_kernel=fp8.available())
            self.weights = fp8_copies.layers
            self.head = fp8_copies.head

    # -- vision: once per image --------------------------------------------------------------------------

    def encode_images(self, rows: list[Newcomer]) -> None:
        """Vision tower + projector for the rows' images, then each cross layer's K/V into the rows' slots."""
        self.write_cross(rows, self.vision_states(rows))

    def vision_states(self, rows: list[Newcomer]) -> torch.Tensor:
        """Vision tower + projector for the rows' images -> [n, tiles * patches, hidden] (no slot touched, so it
        may run on another CUDA stream while the running batch decodes)."""
        if self.tower_graphs is not None:
            states = self.tower_graphs.encode([r.pixel_values for r in rows], [r.aspect_ratio_ids for r in rows],  # type: ignore[misc]
                                              [r.aspect_ratio_mask for r in rows])  # type: ignore[misc]
            if states is not None:
                return states
        dev = self.pools.device
        pixel = torch.cat([r.pixel_values.to(dev, self.dtype, non_blocking=True) for r in rows])  # type: ignore[union-attr]
        ar_mask = torch.cat([r.aspect_ratio_mask for r in rows])  # type: ignore[misc]
        ar_ids = to_device(torch.cat([r.aspect_ratio_ids for r in rows]), dev)  # type: ignore[misc]
        return self.encoder(pixel, ar_ids, to_device(ar_mask, dev), ar_mask)

    def write_cross(self, rows: list[Newcomer], states: torch.Tensor) -> None:
        """Each cross layer's K/V of the rows' image states into the rows' slots."""
        pools = self.pools
        n, length, _ = states.shape
        slots = to_device(torch.tensor([r.slot for r in rows]), pools.device)
        for layer_idx in sorted(self.cross_layers):
            ca = self.layers[layer_idx].cross_attn
            k = ca.k_proj(states).view(n, length, self.nkv, self.hd).transpose(1, 2)
            v = ca.v_proj(states).view(n, length, self.nkv, self.hd).transpose(1, 2)
            k = ca.k_norm(k)
            pools.write_image_kv(pools.cross_index[layer_idx], slots, k, v)

    def set_cross_rows(self, rows: list[Newcomer]) -> None:
        """Per-slot decode masks: which image positions a generated token sees (the prompt's last mask row).

        Fills and pinned copies only: on CUDA ``tensor[i] = number`` (and a blocking copy from the CPU) waits for
        every step queued on the stream, which empties the step loop's pipeline."""
        pools = self.pools
        for r in rows:
            flag = pools.has_image[r.slot : r.slot + 1]
            if r.cross_mask is None:
                flag.zero_()
                pools.cross_bias[r.slot].zero_()
                pools.cross_rowmask[r.slot].zero_()
                continue
            bias, rowmask = self._cross_bias(to_device(r.cross_mask[-1:], pools.device))
            flag.fill_(1)
            pools.cross_bias[r.slot].fill_(self.min_value)
            pools.cross_bias[r.slot, : bias.shape[-1]] = bias[0]
            pools.cross_rowmask[r.slot] = rowmask[0]

    def _cross_bias(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' cross-attention mask arithmetic for [tokens, tiles] -> bias [tokens, C], row mask [tokens].

        A token that may see no tile (before the image token) gets a zero bias (it attends everywhere) and a
        zero row mask (its cross-attention MLP output is dropped): the same as ``_prepare_cross_attention_mask``.
        """
        allowed = mask.to(self.dtype).repeat_interleave(self.num_patches, dim=-1)  # [T, C]
        inverted = 1.0 - allowed
        bias = inverted.masked_fill(inverted.to(torch.bool), self.min_value)
        rowmask = (bias != self.min_value).any(dim=-1).to(self.dtype)
        return bias * rowmask[:, None], rowmask

    # -- prefill: newcomers' prompts, right-padded into one batch ----------------------------------------

    def prefill(self, rows: list[Newcomer]) -> torch.Tensor:
        """Run the rows' prompts, fill their slots' self-attention K/V; return float32 logits [n, vocab]."""
        pools, dev = self.pools, self.pools.device
        n = len(rows)
        lens = [len(r.input_ids) for r in rows]
        t = max(lens)
        ids = torch.zeros(n, t, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : lens[i]] = torch.tensor(r.input_ids)
        # pinned copies, queued: a blocking copy (as torch.tensor(..., device=cuda) makes) waits for the stream
        ids = to_device(ids, dev)
        len_t = to_device(torch.tensor(lens), dev)
        slots = to_device(torch.tensor([r.slot for r in rows]), dev)
        h = self.embed(ids)
        cos, sin = self.cos[:t][None, :, None], self._sin_table[:t][None, :, None]  # [1, t, 1, head_dim]
        # causal and key-padding bias [n, 1, t, t]
        q_pos = self._arange[:t]
        allowed = (q_pos[None, :, None] >= q_pos[None, None, :]) & (q_pos[None, None, :] < len_t[:, None, None])
        self_bias = torch.zeros(n, 1, t, t, dtype=self.dtype, device=dev)
        self_bias.masked_fill_(~allowed[:, None], self.min_value)
        has_image = to_device(torch.tensor([r.cross_mask is not None for r in rows]), dev).to(self.dtype)
        cross_bias, cross_rowmask = self._prefill_cross_masks(rows, t)
        for layer_idx, w in enumerate(self.weights):
            if isinstance(w, CrossWeights):
                ck, cv = pools.image_kv(pools.cross_index[layer_idx], slots)
                h = self._cross_layer(w, h, ck, cv, cross_bias, cross_rowmask, has_image.view(n, 1, 1),
                                      linear=self.proj.linear)
            else:
                h = self._self_layer_prefill(w, h, cos, sin, self_bias, slots, t, pools.self_index[layer_idx])
        last = h[torch.arange(n, device=dev), len_t - 1]  # [n, hidden]
        return self.logits(self.norm(last))

    def _prefill_cross_masks(self, rows: list[Newcomer], t: int) -> tuple[torch.Tensor, torch.Tensor]:
        pools = self.pools
        n, c_len = len(rows), pools.cross_len
        bias = torch.zeros(n, 1, t, c_len, dtype=self.dtype, device=pools.device)
        rowmask = torch.zeros(n, 1, t, 1, dtype=self.dtype, device=pools.device)
        for i, r in enumerate(rows):
            if r.cross_mask is None:
                continue
            b, m = self._cross_bias(to_device(r.cross_mask, pools.device))
            width = b.shape[-1]
            bias[i, 0, : b.shape[0], :width] = b
            if width < c_len:  # positions beyond this image's tiles: never attended
                bias[i, 0, :, width:] = self.min_value
            rowmask[i, 0, : m.shape[0], 0] = m
        return bias, rowmask

    def _self_layer_prefill(
        self, w: SelfWeights, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor,
        slots: torch.Tensor, t: int, s: int,
    ) -> torch.Tensor:
        n, nh, nkv, proj = h.shape[0], self.nh, self.nkv, self.proj
        qkv = proj.linear(rms(w.ln_in, h), w.qkv).view(n, t, nh + 2 * nkv, self.hd)
        qk = self._rope(qkv[:, :, : nh + nkv], cos, sin)  # cos/sin [1, t, 1, head_dim]
        q, k = qk[:, :, :nh].transpose(1, 2), qk[:, :, nh:].transpose(1, 2)
        v = qkv[:, :, nh + nkv :].transpose(1, 2)
        self.pools.k[s][slots, :, :t] = k
        self.pools.v[s][slots, :, :t] = v
        out = attend(q, k, v, bias, self.scale)
        h = proj.add_(h, out.transpose(1, 2).reshape(n, t, -1), w.o)
        return proj.add_(h, mlp(w, rms(w.ln_post, h), proj.linear), w.down)

    def _cross_layer(
        self, w: CrossWeights, h: torch.Tensor, ck: torch.Tensor, cv: torch.Tensor, bias: torch.Tensor,
        rowmask: torch.Tensor, has_image: torch.Tensor, attend_fn: Attend = attend,
        linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.linear,
    ) -> torch.Tensor:
        """h [n, t, hidden]; ck/cv [n, kv_heads, C, head_dim]; bias [n, 1, t, C]; rowmask [n, 1, t, 1]."""
        n, t, _ = h.shape
        q = linear(rms(w.ln_in, h), w.q).view(n, t, self.nh, self.hd)
        q = rms(w.q_norm, q).transpose(1, 2)
        out = attend_fn(q, ck, cv, bias, self.scale)
        attn = linear(out.transpose(1, 2).reshape(n, t, -1), w.o)
        h = h.addcmul_(attn, w.attn_gate * has_image)  # a text-only row (has_image 0) passes unchanged
        down = linear(mlp(w, rms(w.ln_post, h), linear), w.down)
        return h.addcmul_(down, rowmask[:, 0] * (w.mlp_gate * has_image))

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return rope(x, cos, sin) if self.sin_signed is not None else rope_halves(x, cos, sin)

    # -- decode: one token for slots 0..b-1, self K/V read up to length bucket lb ------------------------

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, b: int, lb: int) -> torch.Tensor:
        """tokens/positions [b] (device); returns float32 logits [b, vocab]. Static shapes for given (b, lb)."""
        pools, nh, nkv = self.pools, self.nh, self.nkv
        h = self.embed(tokens.view(b, 1))
        self_form = for_rows(self.self_choice, b)
        step = self.self_step(positions, b, lb) if self_form == "torch" else None
        cross_bias = pools.cross_bias[:b].view(b, 1, 1, -1)
        rowmask = pools.cross_rowmask[:b].view(b, 1, 1, 1)
        has_image = pools.has_image[:b].view(b, 1, 1)
        cross_name = for_rows(self.cross_choice, b)
        cross_attend = CROSS_FORMS[cross_name]
        if cross_name == "triton":  # rows without an image (text-only, or slots the bucket pads with) read no K/V
            cross_attend = functools.partial(cross_attend, rows_on=pools.has_image[:b])
        proj = self.proj
        for layer_idx, w in enumerate(self.weights):
            if isinstance(w, CrossWeights):
                c = pools.cross_index[layer_idx]
                layer_attend = cross_attend
                if pools.image_kv_fp8 and cross_name == "triton":  # the kernel reads the FP8 K/V itself
                    ck, cv = pools.ck[c][:b], pools.cv[c][:b]
                    layer_attend = functools.partial(cross_attend, k_scale=pools.ck_scale[c][:b],
                                                     v_scale=pools.cv_scale[c][:b])
                else:  # bf16 K/V, or FP8 ones dequantized for a PyTorch form (the CPU)
                    ck, cv = pools.image_kv(c, slice(0, b))
                h = self._cross_layer(w, h, ck, cv, cross_bias, rowmask, has_image, layer_attend, proj.linear)
                continue
            qkv = proj.linear(rms(w.ln_in, h), w.qkv).view(b, nh + 2 * nkv, self.hd)
            out = self.self_attend(qkv, positions, step, pools.self_index[layer_idx])
            h = proj.add_(h, out.view(b, 1, -1), w.o)  # [b, heads * d]
            h = proj.add_(h, mlp(w, rms(w.ln_post, h), proj.linear), w.down)
        return self.logits(self.norm(h[:, 0]))

    def self_step(self, positions: torch.Tensor, b: int, lb: int) -> SelfStep:
        """What every self-attention layer of a step shares (PyTorch form): rotary rows, write index, mask."""
        key_ok = self._arange[:lb][None, :] <= positions[:, None]  # [b, lb]
        return SelfStep(
            cos=self.cos[positions].view(b, 1, self.hd),
            sin=self._sin_table[positions].view(b, 1, self.hd),
            write_at=positions.view(b, 1, 1, 1).expand(b, self.nkv, 1, self.hd),
            bias=torch.where(key_ok, 0.0, self.min_value).to(self.dtype).view(b, 1, 1, lb),
            lb=lb,
        )

    def self_attend(self, qkv: torch.Tensor, positions: torch.Tensor, step: SelfStep | None, s: int) -> torch.Tensor:
        """One decode token a row through self-attention pool ``s``: rotary, the new K/V written at each row's
        position, attention over the row's keys. qkv [b, heads + 2 kv_heads, d] -> [b, heads * d]. ``step`` None:
        the Triton kernel (decode_attention.py), else the PyTorch ops."""
        pools, nh, nkv = self.pools, self.nh, self.nkv
        b = qkv.shape[0]
        if step is None:
            return self_attention(qkv, self.cos, self.sin, positions, pools.k[s], pools.v[s], nh, nkv, self.scale)
        qk = self._rope(qkv[:, : nh + nkv], step.cos, step.sin)
        k, v = qk[:, nh:].unsqueeze(2), qkv[:, nh + nkv :].unsqueeze(2)  # [b, kv_heads, 1, head_dim]
        pools.k[s][:b].scatter_(2, step.write_at, k)
        pools.v[s][:b].scatter_(2, step.write_at, v)
        lb = step.lb
        out = attend(qk[:, :nh].unsqueeze(2), pools.k[s][:b, :, :lb], pools.v[s][:b, :, :lb], step.bias, self.scale)
        return out.view(b, -1)  # [b, heads, 1, d] is already [b, heads * d]

    def decode_weights(self) -> list[torch.Tensor | fp8.QuantWeight]:
        """Every weight the decode step multiplies through ``proj`` (what ``gemv.choose`` times)."""
        out = []
        for w in self.weights:
            out += [w.q if isinstance(w, CrossWeights) else w.qkv, w.o, w.gate_up, w.down]
        if self.head is not None:
            out.append(self.head)
        return out

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """float32 logits [b, vocab] of the final hidden states (a bias-free head through ``proj``)."""
        if self.head is not None:
            return self.proj.linear(x, self.head).float()  # type: ignore[arg-type]
        return self.lm_head(x).float()  # type: ignore[no-any-return]


