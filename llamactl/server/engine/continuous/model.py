"""The forward passes of the continuous engine, over transformers' own Mllama modules and weights.

Only the orchestration is ours: which rows, which memory, which masks. Every layer's arithmetic is done by the
checkpoint's modules (projections, norms, MLPs, gates, rotary tables) in the same order as transformers, so a
greedy answer equals ``generate``'s. What differs from ``generate``:
- self-attention K/V live in pre-allocated per-slot memory (``pools.SlotPools``) and are written in place;
- cross-attention K/V are computed once per image (``encode_images``) and kept in the slot while it decodes;
- a decode step covers slots ``0..B-1`` (the scheduler keeps running sequences packed at the front) and reads
  self-attention K/V only up to a length bucket, so its shapes are static and CUDA graphs can replay it;
- rows without an image pass the cross-attention layers unchanged (a per-row 0/1 factor on both residual
  branches), which is what ``generate`` does by skipping those layers for a text-only request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from llamactl.server.engine.continuous.pools import SlotPools


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
    def __init__(self, model: Any, pools: SlotPools) -> None:
        inner = model.model
        text = inner.language_model
        self.vision = inner.vision_model
        self.projector = inner.multi_modal_projector
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
        self.num_patches = int(self.vision.num_patches)
        self.pools = pools
        self.dtype = pools.dtype
        self.min_value = torch.finfo(self.dtype).min
        # Rotary tables for every position a slot can hold, computed by the checkpoint's own rotary module.
        positions = torch.arange(pools.max_len, device=pools.device)[None]
        probe = torch.zeros(1, dtype=self.dtype, device=pools.device)
        cos, sin = text.rotary_emb(probe, position_ids=positions)
        self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()  # [max_len, head_dim]
        self._arange = torch.arange(pools.max_len, device=pools.device)

    # -- vision: once per image --------------------------------------------------------------------------

    def encode_images(self, rows: list[Newcomer]) -> None:
        """Vision tower + projector for the rows' images, then each cross layer's K/V into the rows' slots."""
        pools = self.pools
        pixel = torch.cat([r.pixel_values for r in rows]).to(pools.device, self.dtype)  # type: ignore[misc]
        ar_ids = torch.cat([r.aspect_ratio_ids for r in rows]).to(pools.device)  # type: ignore[misc]
        ar_mask = torch.cat([r.aspect_ratio_mask for r in rows]).to(pools.device)  # type: ignore[misc]
        states = self.vision(pixel_values=pixel, aspect_ratio_ids=ar_ids, aspect_ratio_mask=ar_mask)
        states = states.last_hidden_state  # [n, 1, tiles, patches, dim]
        n, _, tiles, patches, _ = states.shape
        states = self.projector(states).reshape(n, tiles * patches, -1)
        slots = torch.tensor([r.slot for r in rows], device=pools.device)
        length = tiles * patches
        for layer_idx in sorted(self.cross_layers):
            ca = self.layers[layer_idx].cross_attn
            k = ca.k_proj(states).view(n, length, self.nkv, self.hd).transpose(1, 2)
            v = ca.v_proj(states).view(n, length, self.nkv, self.hd).transpose(1, 2)
            k = ca.k_norm(k)
            c = pools.cross_index[layer_idx]
            pools.ck[c][slots, :, :length] = k
            pools.cv[c][slots, :, :length] = v

    def set_cross_rows(self, rows: list[Newcomer]) -> None:
        """Per-slot decode masks: which image positions a generated token sees (the prompt's last mask row)."""
        pools = self.pools
        for r in rows:
            if r.cross_mask is None:
                pools.has_image[r.slot] = 0
                pools.cross_bias[r.slot].zero_()
                pools.cross_rowmask[r.slot] = 0
                continue
            bias, rowmask = self._cross_bias(r.cross_mask[-1:].to(pools.device))
            pools.has_image[r.slot] = 1
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
        ids = ids.to(dev)
        len_t = torch.tensor(lens, device=dev)
        slots = torch.tensor([r.slot for r in rows], device=dev)
        h = self.embed(ids)
        cos, sin = self.cos[:t][None], self.sin[:t][None]
        # causal and key-padding bias [n, 1, t, t]
        q_pos = self._arange[:t]
        allowed = (q_pos[None, :, None] >= q_pos[None, None, :]) & (q_pos[None, None, :] < len_t[:, None, None])
        self_bias = torch.zeros(n, 1, t, t, dtype=self.dtype, device=dev)
        self_bias.masked_fill_(~allowed[:, None], self.min_value)
        has_image = torch.tensor([r.cross_mask is not None for r in rows], device=dev).to(self.dtype)
        cross_bias, cross_rowmask = self._prefill_cross_masks(rows, t)
        for layer_idx, layer in enumerate(self.layers):
            if layer_idx in self.cross_layers:
                c = pools.cross_index[layer_idx]
                h = self._cross_layer(
                    layer, h, pools.ck[c][slots], pools.cv[c][slots], cross_bias, cross_rowmask,
                    has_image.view(n, 1, 1),
                )
            else:
                h = self._self_layer_prefill(layer, h, cos, sin, self_bias, slots, t, pools.self_index[layer_idx])
        last = h[torch.arange(n, device=dev), len_t - 1]  # [n, hidden]
        return self.lm_head(self.norm(last)).float()  # type: ignore[no-any-return]

    def _prefill_cross_masks(self, rows: list[Newcomer], t: int) -> tuple[torch.Tensor, torch.Tensor]:
        pools = self.pools
        n, c_len = len(rows), pools.cross_len
        bias = torch.zeros(n, 1, t, c_len, dtype=self.dtype, device=pools.device)
        rowmask = torch.zeros(n, 1, t, 1, dtype=self.dtype, device=pools.device)
        for i, r in enumerate(rows):
            if r.cross_mask is None:
                continue
            b, m = self._cross_bias(r.cross_mask.to(pools.device))
            width = b.shape[-1]
            bias[i, 0, : b.shape[0], :width] = b
            if width < c_len:  # positions beyond this image's tiles: never attended
                bias[i, 0, :, width:] = self.min_value
            rowmask[i, 0, : m.shape[0], 0] = m
        return bias, rowmask

    def _self_layer_prefill(
        self, layer: Any, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor,
        slots: torch.Tensor, t: int, s: int,
    ) -> torch.Tensor:
        n = h.shape[0]
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        q = attn.q_proj(x).view(n, t, self.nh, self.hd).transpose(1, 2)
        k = attn.k_proj(x).view(n, t, self.nkv, self.hd).transpose(1, 2)
        v = attn.v_proj(x).view(n, t, self.nkv, self.hd).transpose(1, 2)
        q, k = _rope(q, k, cos, sin)
        self.pools.k[s][slots, :, :t] = k
        self.pools.v[s][slots, :, :t] = v
        out = _attend(q, k, v, bias, self.scale, self.group)
        h = h + attn.o_proj(out.transpose(1, 2).reshape(n, t, -1))
        return h + layer.mlp(layer.post_attention_layernorm(h))  # type: ignore[no-any-return]

    def _cross_layer(
        self, layer: Any, h: torch.Tensor, ck: torch.Tensor, cv: torch.Tensor, bias: torch.Tensor,
        rowmask: torch.Tensor, has_image: torch.Tensor,
    ) -> torch.Tensor:
        """h [n, t, hidden]; ck/cv [n, kv_heads, C, head_dim]; bias [n, 1, t, C]; rowmask [n, 1, t, 1]."""
        n, t, _ = h.shape
        ca = layer.cross_attn
        x = layer.input_layernorm(h)
        q = ca.q_proj(x).view(n, t, self.nh, self.hd).transpose(1, 2)
        q = ca.q_norm(q)
        out = _attend(q, ck, cv, bias, self.scale, self.group)
        attn = ca.o_proj(out.transpose(1, 2).reshape(n, t, -1))
        h = h + (layer.cross_attn_attn_gate.tanh() * attn) * has_image
        mlp = layer.mlp(layer.post_attention_layernorm(h))
        mlp = rowmask[:, 0] * mlp
        return h + (layer.cross_attn_mlp_gate.tanh() * mlp) * has_image  # type: ignore[no-any-return]

    # -- decode: one token for slots 0..b-1, self K/V read up to length bucket lb ------------------------

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, b: int, lb: int) -> torch.Tensor:
        """tokens/positions [b] (device); returns float32 logits [b, vocab]. Static shapes for given (b, lb)."""
        pools = self.pools
        h = self.embed(tokens.view(b, 1))
        cos = self.cos[positions].view(b, 1, self.hd)
        sin = self.sin[positions].view(b, 1, self.hd)
        key_ok = self._arange[:lb][None, :] <= positions[:, None]  # [b, lb]
        self_bias = torch.where(key_ok, 0.0, self.min_value).to(self.dtype).view(b, 1, 1, lb)
        cross_bias = pools.cross_bias[:b].view(b, 1, 1, -1)
        rowmask = pools.cross_rowmask[:b].view(b, 1, 1, 1)
        has_image = pools.has_image[:b].view(b, 1, 1)
        write_at = positions.view(b, 1, 1, 1).expand(b, self.nkv, 1, self.hd)
        for layer_idx, layer in enumerate(self.layers):
            if layer_idx in self.cross_layers:
                c = pools.cross_index[layer_idx]
                h = self._cross_layer(layer, h, pools.ck[c][:b], pools.cv[c][:b], cross_bias, rowmask, has_image)
                continue
            s = pools.self_index[layer_idx]
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(b, 1, self.nh, self.hd).transpose(1, 2)
            k = attn.k_proj(x).view(b, 1, self.nkv, self.hd).transpose(1, 2)
            v = attn.v_proj(x).view(b, 1, self.nkv, self.hd).transpose(1, 2)
            q, k = _rope(q, k, cos, sin)
            pools.k[s][:b].scatter_(2, write_at, k)
            pools.v[s][:b].scatter_(2, write_at, v)
            out = _attend(q, pools.k[s][:b, :, :lb], pools.v[s][:b, :, :lb], self_bias, self.scale, self.group)
            h = h + attn.o_proj(out.transpose(1, 2).reshape(b, 1, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.lm_head(self.norm(h[:, 0])).float()  # type: ignore[no-any-return]


def _rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding as transformers applies it (cos/sin [n, t, head_dim] broadcast over heads)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float, group: int
) -> torch.Tensor:
    """Grouped-query attention without repeating K/V in memory.

    q [n, heads, t, d]; k/v [n, kv_heads, L, d]; bias [n, 1, t, L] -> [n, heads, t, d]. Query heads are grouped
    under the K/V head they share, so each K/V element is read once per step (decode is bandwidth-bound).
    """
    n, heads, t, d = q.shape
    kv_heads = k.shape[1]
    qg = q.reshape(n, kv_heads, group * t, d)
    scores = torch.matmul(qg, k.transpose(-1, -2)) * scale  # [n, kv, group*t, L]
    scores = scores.view(n, kv_heads, group, t, -1) + bias.unsqueeze(1)
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(weights.view(n, kv_heads, group * t, -1), v)
    return out.view(n, heads, t, d)
