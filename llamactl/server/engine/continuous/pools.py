"""Pre-allocated per-slot memory: self-attention K/V up to ``max_len`` tokens and one image's cross-attention K/V.

A slot holds one sequence from its prefill to its last token. Running sequences occupy slots ``0..n-1``: when
one finishes, the last running sequence moves into its slot (``move``), so a decode step over ``b`` rows reads
exactly the memory of ``b`` sequences and a CUDA graph per batch size stays valid. Sizing (``plan_slots``) is
pure arithmetic on free memory, so admission can never over-commit: a request waits until a slot is free.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llamactl.server.engine.continuous.fp8 import dequantize_image_kv, quantize_image_kv


@dataclass(frozen=True)
class PoolShape:
    self_layers: int
    cross_layers: int
    kv_heads: int
    head_dim: int
    max_len: int  # tokens per slot (prompt + answer)
    cross_len: int  # image positions per slot (tiles x patches)
    element_bytes: int
    image_kv_fp8: bool = False  # image K/V as e4m3 with a float32 scale per slot and K/V head (quantization fp8)

    @property
    def self_bytes_per_slot(self) -> int:
        return 2 * self.self_layers * self.kv_heads * self.max_len * self.head_dim * self.element_bytes

    @property
    def cross_bytes_per_slot(self) -> int:
        if self.image_kv_fp8:
            return 2 * self.cross_layers * self.kv_heads * (self.cross_len * self.head_dim + 4)
        return 2 * self.cross_layers * self.kv_heads * self.cross_len * self.head_dim * self.element_bytes

    @property
    def bytes_per_slot(self) -> int:
        return self.self_bytes_per_slot + self.cross_bytes_per_slot


def plan_slots(shape: PoolShape, wanted: int, free_bytes: int | None, reserve_bytes: int) -> int:
    """How many slots to allocate: ``wanted`` (max batch size), fewer when free memory cannot hold them.

    ``free_bytes`` None = no device limit known (CPU). Raises ValueError when not even one slot fits.
    """
    if free_bytes is None:
        return wanted
    fits = (free_bytes - reserve_bytes) // shape.bytes_per_slot
    if fits < 1:
        raise ValueError(
            f"not enough GPU memory for one sequence: {free_bytes / 2**30:.1f} GiB free, "
            f"{reserve_bytes / 2**30:.1f} GiB kept for activations, {shape.bytes_per_slot / 2**30:.2f} GiB per slot"
        )
    return int(min(wanted, fits))


class SlotPools:
    def __init__(
        self,
        shape: PoolShape,
        slots: int,
        self_layer_ids: list[int],
        cross_layer_ids: list[int],
        dtype: torch.dtype,
        device: str,
    ) -> None:
        self.shape, self.slots, self.dtype, self.device = shape, slots, dtype, device
        self.max_len, self.cross_len = shape.max_len, shape.cross_len
        self.self_index = {layer: i for i, layer in enumerate(self_layer_ids)}
        self.cross_index = {layer: i for i, layer in enumerate(cross_layer_ids)}
        kv = (slots, shape.kv_heads, shape.max_len, shape.head_dim)
        cx = (slots, shape.kv_heads, shape.cross_len, shape.head_dim)
        # zeros, not empty: a text-only row multiplies its cross-attention output by 0, and 0 * NaN is NaN.
        self.k = [torch.zeros(kv, dtype=dtype, device=device) for _ in self_layer_ids]
        self.v = [torch.zeros(kv, dtype=dtype, device=device) for _ in self_layer_ids]
        image_dtype = torch.float8_e4m3fn if shape.image_kv_fp8 else dtype
        self.ck = [torch.zeros(cx, dtype=image_dtype, device=device) for _ in cross_layer_ids]
        self.cv = [torch.zeros(cx, dtype=image_dtype, device=device) for _ in cross_layer_ids]
        # FP8 image K/V: what each slot's K and V per K/V head stand for is ck * ck_scale, cv * cv_scale
        scaled = cross_layer_ids if shape.image_kv_fp8 else []
        self.ck_scale = [torch.ones(slots, shape.kv_heads, dtype=torch.float32, device=device) for _ in scaled]
        self.cv_scale = [torch.ones(slots, shape.kv_heads, dtype=torch.float32, device=device) for _ in scaled]
        self.cross_bias = torch.zeros(slots, shape.cross_len, dtype=dtype, device=device)
        self.cross_rowmask = torch.zeros(slots, dtype=dtype, device=device)
        self.has_image = torch.zeros(slots, dtype=dtype, device=device)

    @property
    def bytes(self) -> int:
        return self.slots * self.shape.bytes_per_slot

    @property
    def image_kv_fp8(self) -> bool:
        return self.shape.image_kv_fp8

    def write_image_kv(self, c: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Cross layer ``c``'s K/V of images [n, kv_heads, L, d] into ``slots`` (quantized where FP8)."""
        length = k.shape[2]
        if not self.image_kv_fp8:
            self.ck[c][slots, :, :length] = k
            self.cv[c][slots, :, :length] = v
            return
        for pool, scales, x in ((self.ck[c], self.ck_scale[c], k), (self.cv[c], self.cv_scale[c], v)):
            q, scale = quantize_image_kv(x)
            pool[slots, :, :length] = q
            scales[slots] = scale

    def image_kv(self, c: int, rows: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross layer ``c``'s K/V of ``rows`` (slot indices or a slice) in the model dtype: the pools' own
        memory, or where FP8 dequantized copies (the prefill, and cross-attention forms other than Triton's)."""
        k, v = self.ck[c][rows], self.cv[c][rows]
        if not self.image_kv_fp8:
            return k, v
        return (dequantize_image_kv(k, self.ck_scale[c][rows], self.dtype),
                dequantize_image_kv(v, self.cv_scale[c][rows], self.dtype))

    def move(self, src: int, dst: int, length: int, has_image: bool) -> None:
        """Copy slot ``src``'s sequence (``length`` tokens of self K/V, its image K/V and masks) into ``dst``."""
        for k, v in zip(self.k, self.v):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]
        if has_image:
            for pool in (*self.ck, *self.cv, *self.ck_scale, *self.cv_scale):  # no scales unless FP8
                pool[dst] = pool[src]
        self.cross_bias[dst] = self.cross_bias[src]
        self.cross_rowmask[dst] = self.cross_rowmask[src]
        self.has_image[dst] = self.has_image[src]

    def vacate(self, slot: int) -> None:
        """Mark ``slot`` as holding no sequence: a batch bucket that pads over it reads none of its image K/V.
        A fill, not ``has_image[slot] = 0``: on CUDA that is a blocking copy of a CPU number, which waits for every
        step queued on the stream (py-spy on an H200: ~14 % of the step loop's time, bench/results/engine.md,
        Session 17)."""
        self.has_image[slot : slot + 1].zero_()
