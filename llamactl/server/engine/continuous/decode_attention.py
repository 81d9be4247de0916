"""The decode step's attention as Triton kernels (CUDA): one token a row, grouped queries, K/V read once.

Why: in a decode step the attention is a handful of small kernels per layer, each a few microseconds, and at
batch 1 the cross-attention's matmuls read the image K/V (26 MB a layer) at a fraction of the bandwidth (an H100:
66 us a layer where the bytes need ~9 us; bench/results/engine_bench_run9.json). Here:
- ``self_attention``: one kernel per self-attention layer does what took nine (rotary on q and the new key, the
  new key and value written into the slot at the row's position, scores, mask, softmax, weighted sum); each
  program owns one row and one K/V head with its query heads, and reads only the keys up to the row's position;
- ``cross_attention``: the image K/V split across programs (flash-decoding: each program a stretch of positions,
  then one small kernel merges the partial softmaxes), so at one row every SM streams K/V; same signature as
  ``cross_attention.CANDIDATES`` so the start-time choice times it beside the others.
Arithmetic: float32 inside (scores, softmax, sums), bf16 in and out; the query and new key are rounded to the
model dtype after rotary, as the stored keys are. Checked against ``fused.attend`` at start (a form that differs is
never chosen), by ``bench/engine_gpu_check.py`` (answers equal ``generate`` with the kernels forced on) and, where
Triton is installed, in its interpreter (tests/server/test_decode_attention.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:  # triton ships with CUDA builds of torch; CPU installs run without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None

BLOCK_L = 64  # keys per inner iteration
_G_PAD = 16  # query heads of one K/V head, padded to the smallest tl.dot tile


@dataclass(frozen=True)
class CrossConfig:
    """How ``cross_attention`` splits its work: programs per SM it aims at, keys per iteration, warps, stages.

    The default was the fastest of 48 on an H200 at 8 and 32 rows and within 0.5 us of the best at one row
    (bench/results/engine_cross_probe_run1_h200.json: 12.3 / 57.8 / 197.3 us a layer at 1 / 8 / 32 rows, where
    two programs per SM gave 13.9 / 69.8 / 247.1 and cuDNN's fused attention is slower from one row to 32)."""

    per_sm: int = 4
    block: int = BLOCK_L
    warps: int = 4
    stages: int = 2


CROSS_CONFIG = CrossConfig()


def available() -> bool:
    return triton is not None and torch.cuda.is_available()


def _precision(x: torch.Tensor) -> str:
    """float32 models (the GPU check's tiny model) multiply in full precision, not TF32."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


if triton is not None:

    @triton.jit  # type: ignore[untyped-decorator]
    def _softmax_update(s, vb, m_i, l_i, acc, PRECISION: tl.constexpr):  # type: ignore[no-untyped-def]
        """One block of keys into a running softmax: scores s [G, BLOCK], values vb [BLOCK, HD]; the running
        max m_i, sum l_i and weighted values acc are rescaled to the new max (flash-attention's online form)."""
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=PRECISION)
        return m_new, l_i, acc

    @triton.jit  # type: ignore[untyped-decorator]
    def _self_kernel(  # type: ignore[no-untyped-def]
        qkv_ptr, cos_ptr, sin_ptr, pos_ptr, k_ptr, v_ptr, out_ptr,
        stride_qkv, stride_table, stride_kr, stride_kh, stride_kp, stride_out, scale,
        NH: tl.constexpr, NKV: tl.constexpr, GROUP: tl.constexpr, G_PAD: tl.constexpr, HD: tl.constexpr,
        BLOCK: tl.constexpr, PRECISION: tl.constexpr,
    ):
        row = tl.program_id(0)
        kvh = tl.program_id(1)
        pos = tl.load(pos_ptr + row)
        d = tl.arange(0, HD)
        rot = (d + HD // 2) % HD  # rotate_half(x)[d] = -x[d + half] below half, x[d - half] above
        cos = tl.load(cos_ptr + pos * stride_table + d).to(tl.float32)
        sin = tl.load(sin_ptr + pos * stride_table + d).to(tl.float32) * tl.where(d < HD // 2, -1.0, 1.0)
        base = qkv_ptr + row * stride_qkv
        kh = (NH + kvh) * HD
        k_new = tl.load(base + kh + d).to(tl.float32) * cos + tl.load(base + kh + rot).to(tl.float32) * sin
        k_new = k_new.to(k_ptr.dtype.element_ty)
        v_new = tl.load(base + (NH + NKV + kvh) * HD + d)
        cache = row * stride_kr + kvh * stride_kh
        tl.store(k_ptr + cache + pos * stride_kp + d, k_new)
        tl.store(v_ptr + cache + pos * stride_kp + d, v_new)
        g = tl.arange(0, G_PAD)
        g_ok = g < GROUP
        q_at = (kvh * GROUP + g) * HD
        q = tl.load(base + q_at[:, None] + d[None, :], mask=g_ok[:, None], other=0.0).to(tl.float32)
        q_rot = tl.load(base + q_at[:, None] + rot[None, :], mask=g_ok[:, None], other=0.0).to(tl.float32)
        q = (q * cos[None, :] + q_rot * sin[None, :]).to(k_ptr.dtype.element_ty)
        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, HD], tl.float32)
        for start in range(0, pos + 1, BLOCK):
            keys = start + tl.arange(0, BLOCK)
            stored = keys < pos  # the new key and value are in registers, not read back
            at = cache + keys[:, None] * stride_kp + d[None, :]
            kb = tl.load(k_ptr + at, mask=stored[:, None], other=0.0)
            vb = tl.load(v_ptr + at, mask=stored[:, None], other=0.0)
            kb = tl.where((keys == pos)[:, None], k_new[None, :], kb)
            vb = tl.where((keys == pos)[:, None], v_new[None, :], vb)
            s = tl.dot(q, tl.trans(kb), input_precision=PRECISION) * scale
            s = tl.where((keys <= pos)[None, :], s, float("-inf"))
            m_i, l_i, acc = _softmax_update(s, vb, m_i, l_i, acc, PRECISION)
        out = acc / l_i[:, None]
        tl.store(out_ptr + row * stride_out + q_at[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=g_ok[:, None])

    @triton.jit  # type: ignore[untyped-decorator]
    def _cross_partial_kernel(  # type: ignore[no-untyped-def]
        q_ptr, k_ptr, v_ptr, bias_ptr, on_ptr, ks_ptr, vs_ptr, out_ptr, m_ptr, l_ptr,
        stride_qr, stride_qh, stride_kr, stride_kh, stride_kp, stride_br, stride_sr, L, per_split, scale,
        GROUP: tl.constexpr, G_PAD: tl.constexpr, HD: tl.constexpr, BLOCK: tl.constexpr, SPLITS: tl.constexpr,
        NKV: tl.constexpr, PRECISION: tl.constexpr, HAS_ON: tl.constexpr, SCALED: tl.constexpr,
    ):
        row = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        d = tl.arange(0, HD)
        g = tl.arange(0, G_PAD)
        g_ok = g < GROUP
        q = tl.load(q_ptr + row * stride_qr + (kvh * GROUP + g)[:, None] * stride_qh + d[None, :],
                    mask=g_ok[:, None], other=0.0)
        cache = row * stride_kr + kvh * stride_kh
        first = split * per_split
        last = tl.minimum(first + per_split, L)
        if HAS_ON:  # a row marked off (no image, or a slot nobody holds) reads none of its K/V
            last = tl.where(tl.load(on_ptr + row) != 0, last, first)
        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, HD], tl.float32)
        if SCALED:  # FP8 image K/V: one scale per row and K/V head, applied to the scores and the weighted sum
            scale = scale * tl.load(ks_ptr + row * stride_sr + kvh)
            if q.dtype == tl.bfloat16:  # the normalized query fits fp16, whose conversion from e4m3 is cheap
                q = q.to(tl.float16)
        for start in range(first, last, BLOCK):
            keys = start + tl.arange(0, BLOCK)
            ok = keys < last
            at = cache + keys[:, None] * stride_kp + d[None, :]
            kb = tl.load(k_ptr + at, mask=ok[:, None], other=0.0)
            vb = tl.load(v_ptr + at, mask=ok[:, None], other=0.0)
            if SCALED:  # e4m3 -> fp16 is one instruction (-> bf16 goes through float32); 16-bit q is fp16 then
                kb = kb.to(q.dtype)
                vb = vb.to(q.dtype)
            bias = tl.load(bias_ptr + row * stride_br + keys, mask=ok, other=0.0).to(tl.float32)
            s = tl.dot(q, tl.trans(kb), input_precision=PRECISION) * scale + bias[None, :]
            s = tl.where(ok[None, :], s, float("-inf"))
            m_i, l_i, acc = _softmax_update(s, vb, m_i, l_i, acc, PRECISION)
        if SCALED:
            acc = acc * tl.load(vs_ptr + row * stride_sr + kvh)
        part = (row * NKV + kvh) * SPLITS + split
        rows_at = part * G_PAD + g
        tl.store(out_ptr + rows_at[:, None] * HD + d[None, :], acc)
        tl.store(m_ptr + rows_at, m_i)
        tl.store(l_ptr + rows_at, l_i)

    @triton.jit  # type: ignore[untyped-decorator]
    def _cross_merge_kernel(  # type: ignore[no-untyped-def]
        part_ptr, m_ptr, l_ptr, out_ptr, stride_or, stride_oh,
        GROUP: tl.constexpr, G_PAD: tl.constexpr, HD: tl.constexpr, SPLITS: tl.constexpr, S_PAD: tl.constexpr,
        NKV: tl.constexpr,
    ):
        row = tl.program_id(0)
        kvh = tl.program_id(1)
        g = tl.program_id(2)  # one query head of the group
        s = tl.arange(0, S_PAD)
        s_ok = s < SPLITS
        d = tl.arange(0, HD)
        at = ((row * NKV + kvh) * SPLITS + s) * G_PAD + g
        m = tl.load(m_ptr + at, mask=s_ok, other=float("-inf"))
        top = tl.max(m, 0)
        top = tl.where(top == float("-inf"), 0.0, top)  # a row marked off: no stretch saw a key
        weight = tl.exp(m - top)
        weight = tl.where(s_ok, weight, 0.0)
        total = tl.sum(weight * tl.load(l_ptr + at, mask=s_ok, other=0.0), 0)
        acc = tl.load(part_ptr + at[:, None] * HD + d[None, :], mask=s_ok[:, None], other=0.0)
        out = tl.sum(acc * weight[:, None], 0) / tl.where(total == 0.0, 1.0, total)  # off: zeros
        tl.store(out_ptr + row * stride_or + (kvh * GROUP + g) * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def self_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int, kv_heads: int,
                   scale: float) -> torch.Tensor:
    """One decode token a row: qkv [b, heads + 2 kv_heads, d] (before rotary); cos/sin [max_len, d] tables
    (transformers' form: ``x * cos + rotate_half(x) * sin``); positions [b]; k/v_cache [slots, kv_heads, max_len, d]
    (rows 0..b-1 are the batch's). Writes each row's rotated key and value at its position and returns the
    attention over keys 0..position (reading no others): [b, heads * d]."""
    b, _, d = qkv.shape
    _check_head_dim(d)
    out = torch.empty(b, heads * d, dtype=qkv.dtype, device=qkv.device)
    _self_kernel[(b, kv_heads)](
        qkv, cos, sin, positions, k_cache, v_cache, out,
        qkv.stride(0), cos.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), out.stride(0), scale,
        NH=heads, NKV=kv_heads, GROUP=heads // kv_heads, G_PAD=max(_G_PAD, heads // kv_heads), HD=d, BLOCK=BLOCK_L,
        PRECISION=_precision(qkv), num_warps=4, num_stages=2,
    )
    return out


def _check_head_dim(d: int) -> None:
    if d < 16 or d & (d - 1):
        raise ValueError(f"the Triton decode attention takes power-of-two head dims from 16, not {d}")


def splits_for(rows: int, kv_heads: int, length: int, sms: int, per_sm: int = 4, block: int = BLOCK_L) -> int:
    """Stretches of image positions per (row, K/V head): about ``per_sm`` programs per SM, each at least a block."""
    want = max(1, round(per_sm * sms / max(1, rows * kv_heads)))
    splits = max(1, min(want, 64, length // block))
    per = -(-length // splits)
    return -(-length // per)  # no empty stretch


def cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                    scale: float, config: CrossConfig | None = None,
                    rows_on: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
                    v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """As ``fused.attend`` for one query token a row: q [n, heads, 1, d]; k/v [n, kv_heads, L, d] (the pools'
    slices: the position stride may exceed d); bias [n, 1, 1, L] additive -> [n, heads, 1, d].

    ``rows_on`` [>= n] (device, any dtype; the pools' ``has_image``): a row with 0 reads none of its K/V and gets
    zeros. Its output is multiplied by 0 downstream (a text-only row, or a slot a batch bucket pads with), so
    its ~210 MB of image K/V a step need not be read.

    ``k_scale``/``v_scale`` [>= n, kv_heads] float32: k/v are FP8 (``fp8.quantize_image_kv``), standing for
    ``k * k_scale`` and ``v * v_scale`` (half the bytes to read)."""
    n, heads, t, d = q.shape
    if t != 1:
        raise ValueError("the Triton cross-attention takes one query token a row")
    kv_heads, length = k.shape[1], k.shape[2]
    if k.stride() != v.stride() or k.stride(3) != 1 or q.stride(3) != 1 or bias.stride(3) != 1:
        raise ValueError("the Triton cross-attention needs contiguous head dims and K/V of one layout")
    _check_head_dim(d)
    group = heads // kv_heads
    g_pad = max(_G_PAD, group)
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 8
    cfg = config or CROSS_CONFIG
    splits = splits_for(n, kv_heads, length, sms, cfg.per_sm, cfg.block)
    per = -(-length // splits)
    rows = n * kv_heads * splits * g_pad
    part = torch.empty(rows, d, dtype=torch.float32, device=q.device)
    m = torch.empty(rows, dtype=torch.float32, device=q.device)
    l_sum = torch.empty(rows, dtype=torch.float32, device=q.device)
    out = torch.empty(n, heads, 1, d, dtype=q.dtype, device=q.device)
    scaled = k_scale is not None
    if scaled and (v_scale is None or k_scale.stride(1) != 1 or v_scale.stride() != k_scale.stride()):  # type: ignore[union-attr]
        raise ValueError("FP8 K/V need k_scale and v_scale of one layout, [rows, kv_heads] with unit head stride")
    ks = k_scale if scaled else m  # not read unless scaled
    vs = v_scale if scaled else m
    _cross_partial_kernel[(n, kv_heads, splits)](
        q, k, v, bias, bias if rows_on is None else rows_on, ks, vs, part, m, l_sum,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), bias.stride(0),
        ks.stride(0) if scaled else 0, length, per, scale,  # type: ignore[union-attr]
        GROUP=group, G_PAD=g_pad, HD=d, BLOCK=cfg.block, SPLITS=splits, NKV=kv_heads,
        PRECISION=_precision(q), HAS_ON=rows_on is not None, SCALED=scaled, num_warps=cfg.warps,
        num_stages=cfg.stages,
    )
    _cross_merge_kernel[(n, kv_heads, group)](
        part, m, l_sum, out, out.stride(0), out.stride(1),
        GROUP=group, G_PAD=g_pad, HD=d, SPLITS=splits, S_PAD=triton.next_power_of_2(splits), NKV=kv_heads,
        num_warps=4,
    )
    return out

