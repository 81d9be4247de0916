"""The vision tower's unmasked attention as a Triton kernel at its own head dim (80 for the 11B tower).

Why: the tower's attention is over half its time (8 four-tile images: ~175 ms of ~350 on an H200, cuDNN at ~390
TFLOP/s; bench/results/engine_tower_probe_run2_h200.json). Library kernels are tuned for head dims 64 and 128;
zero-padding 80 to 96 or 128 was slower (engine_vision_attn_probe_run1_h200.json). Triton's block shapes must be
powers of two, so here the head dim is split into two parts (80 = 64 + 16, the 16 loaded as 32 columns with the
upper half masked to zero): the scores are the sum of two dot products and the output is kept as two
accumulators (96 columns computed instead of 128). Flash-attention order: one
program per block of query rows of one (image, head), keys and values streamed in blocks, an online softmax in
float32 (base 2, the scale folded in). vision.py times it at start against the library kernels and keeps it only
where it is faster and matches them.
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


@dataclass(frozen=True)
class Config:
    block_m: int
    block_n: int
    warps: int
    stages: int

    def __str__(self) -> str:
        return f"m{self.block_m}n{self.block_n}w{self.warps}s{self.stages}"


CONFIGS = [Config(m, n, w, s) for m, n, w, s in [
    (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 64, 4, 3), (128, 32, 4, 3), (64, 128, 4, 2),
]]


def available() -> bool:
    return triton is not None and torch.cuda.is_available()


def head_split(d: int) -> tuple[int, int] | None:
    """The head dim as a power of two plus a remainder, the remainder's columns padded to a power of two >= 32
    (dots of 16 columns came out wrong or faulted on an H200 with Triton 3.6: bench/results/engine.md, Session 10):
    (high, padded low) with high + low >= d, or None where the padding would be wider than the high part."""
    high = 1 << (d.bit_length() - 1)
    if high == d:
        return (d, 0) if d >= 16 else None
    low = max(32, 1 << (d - high - 1).bit_length())
    return (high, low) if low < high else None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
              config: Config | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v without a mask. q/k/v [n, heads, L, d] (any strides, last dim contiguous) ->
    [n, heads, L, d], a view of a [n, L, heads, d] tensor (the layout the tower's o projection reads)."""
    n, heads, length, d = q.shape
    split = head_split(d)
    if split is None:
        raise ValueError(f"head dim {d}: no split into a power of two and a narrower padded part")
    if min(q.stride(-1), k.stride(-1), v.stride(-1)) != 1:
        raise ValueError("q/k/v need a contiguous last dim")
    out = torch.empty(n, length, heads, d, device=q.device, dtype=q.dtype).transpose(1, 2)
    scale = d**-0.5 if scale is None else scale
    config = config or CONFIGS[0]
    grid = (triton.cdiv(length, config.block_m), n * heads)
    _attention_kernel[grid](
        q, k, v, out, heads, scale * 1.4426950408889634,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        LENGTH=length, HEAD_DIM=d, D_HIGH=split[0], D_LOW=split[1], BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        num_warps=config.warps, num_stages=config.stages,
    )
    return out


if triton is not None:

    @triton.jit  # type: ignore[untyped-decorator]
    def _key_block(  # type: ignore[no-untyped-def]
        q_h, q_l, acc_h, acc_l, m_i, l_i, k_base, v_base, start_n, skl, svl, qk_scale,
        LENGTH: tl.constexpr, HEAD_DIM: tl.constexpr, D_HIGH: tl.constexpr, D_LOW: tl.constexpr,
        BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    ):
        """One block of keys into the running softmax and accumulators (the head dim in two parts)."""
        key = start_n + tl.arange(0, BLOCK_N)
        key_ok = key < LENGTH
        cols_h = tl.arange(0, D_HIGH)
        if MASKED:
            k_h = tl.load(k_base + key[None, :] * skl + cols_h[:, None], mask=key_ok[None, :], other=0.0)
        else:
            k_h = tl.load(k_base + key[None, :] * skl + cols_h[:, None])
        s = tl.dot(q_h, k_h)
        if D_LOW > 0:
            cols_l = D_HIGH + tl.arange(0, D_LOW)
            col_ok = cols_l < HEAD_DIM
            k_l = tl.load(k_base + key[None, :] * skl + cols_l[:, None], mask=key_ok[None, :] & col_ok[:, None],
                          other=0.0)
            s = tl.dot(q_l, k_l, s)
        s = s * qk_scale
        if MASKED:
            s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(v_base.dtype.element_ty)
        if MASKED:
            v_h = tl.load(v_base + key[:, None] * svl + cols_h[None, :], mask=key_ok[:, None], other=0.0)
        else:
            v_h = tl.load(v_base + key[:, None] * svl + cols_h[None, :])
        acc_h = tl.dot(p, v_h, acc_h * alpha[:, None])
        if D_LOW > 0:
            v_l = tl.load(v_base + key[:, None] * svl + cols_l[None, :], mask=key_ok[:, None] & col_ok[None, :],
                          other=0.0)
            acc_l = tl.dot(p, v_l, acc_l * alpha[:, None])
        return acc_h, acc_l, m_new, l_i

    @triton.jit  # type: ignore[untyped-decorator]
    def _attention_kernel(  # type: ignore[no-untyped-def]
        q_ptr, k_ptr, v_ptr, o_ptr, heads, qk_scale,
        sqn, sqh, sql, skn, skh, skl, svn, svh, svl, son, soh, sol,
        LENGTH: tl.constexpr, HEAD_DIM: tl.constexpr, D_HIGH: tl.constexpr, D_LOW: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        start_m = tl.program_id(0) * BLOCK_M
        image = tl.program_id(1) // heads
        head = tl.program_id(1) % heads
        q_base = q_ptr + image.to(tl.int64) * sqn + head * sqh
        k_base = k_ptr + image.to(tl.int64) * skn + head * skh
        v_base = v_ptr + image.to(tl.int64) * svn + head * svh
        o_base = o_ptr + image.to(tl.int64) * son + head * soh
        rows = start_m + tl.arange(0, BLOCK_M)
        row_ok = rows < LENGTH
        cols_h = tl.arange(0, D_HIGH)
        q_h = tl.load(q_base + rows[:, None] * sql + cols_h[None, :], mask=row_ok[:, None], other=0.0)
        acc_h = tl.zeros([BLOCK_M, D_HIGH], tl.float32)
        # D_LOW == 0: a one-column placeholder the helper never reads
        cols_l = D_HIGH + tl.arange(0, D_LOW if D_LOW > 0 else 1)
        col_ok = cols_l < HEAD_DIM
        if D_LOW > 0:
            q_l = tl.load(q_base + rows[:, None] * sql + cols_l[None, :], mask=row_ok[:, None] & col_ok[None, :],
                          other=0.0)
        else:
            q_l = tl.zeros([BLOCK_M, 1], q_ptr.dtype.element_ty)
        acc_l = tl.zeros([BLOCK_M, D_LOW if D_LOW > 0 else 1], tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        FULL: tl.constexpr = (LENGTH // BLOCK_N) * BLOCK_N
        for start_n in range(0, FULL, BLOCK_N):
            acc_h, acc_l, m_i, l_i = _key_block(q_h, q_l, acc_h, acc_l, m_i, l_i, k_base, v_base, start_n, skl,
                                                svl, qk_scale, LENGTH, HEAD_DIM, D_HIGH, D_LOW, BLOCK_N, False)
        if FULL < LENGTH:
            acc_h, acc_l, m_i, l_i = _key_block(q_h, q_l, acc_h, acc_l, m_i, l_i, k_base, v_base, FULL, skl, svl,
                                                qk_scale, LENGTH, HEAD_DIM, D_HIGH, D_LOW, BLOCK_N, True)
        inv = 1.0 / l_i
        tl.store(o_base + rows[:, None] * sol + cols_h[None, :], (acc_h * inv[:, None]).to(o_ptr.dtype.element_ty),
                 mask=row_ok[:, None])
        if D_LOW > 0:
            tl.store(o_base + rows[:, None] * sol + cols_l[None, :],
                     (acc_l * inv[:, None]).to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
