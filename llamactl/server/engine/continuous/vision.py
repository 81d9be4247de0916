"""The vision tower + projector for the continuous engine, with its attention free of the L x L mask.

Mllama's vision mask (transformers' ``_prepare_aspect_ratio_attention_mask``, as in Meta's reference code) masks a
(query, key) pair only when BOTH are padding: the patches that pad each tile to a multiple of 8, and the tiles an
image does not use. Every real patch attends to every position. transformers still hands the attention kernel a
dense [n, 1, L, L] bias (L = 4 tiles x 1608 = 6,432: ~660 MB for 8 images, read again by each layer and head),
which also keeps the fastest kernels (which take no bias) away. Here each attention layer runs:
1. one attention without any mask, for every row (right for every real row);
2. the padding rows again, attending only to real keys (a broadcast key mask), written over their rows.
Same arithmetic as transformers up to kernel rounding (the padding rows are ~0.4 % of a 4-tile image's rows).
Which rows are padding is known on the CPU from the processor's ``aspect_ratio_mask`` before the tower runs, so
nothing in it waits for the GPU. The function is registered with transformers' attention interface under a name
only this engine's vision config uses; without rows set (any other caller) it falls back to transformers' SDPA.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from llamactl.server.engine.continuous import flash4
from llamactl.server.engine.continuous.kernel_choice import choose_fastest
from llamactl.server.engine.continuous.tower import FusedTower

ATTENTION_NAME = "llamactl_vision_split_mask"


class PaddingRows:
    """The padding rows of the images now in the tower (set around each call, on the model thread)."""

    def __init__(self) -> None:
        # [n, P] row indices; a shorter list repeats its last row (or row 0, a real row: recomputing it with a
        # key mask that masks nothing gives the same values)
        self.rows: torch.Tensor | None = None
        self.key_bias: torch.Tensor | None = None  # [n, 1, 1, L]: 0 for real keys, dtype min for padding keys
        self.backends: list[SDPBackend] | None = None  # the unmasked attention's kernels (None: torch's choice)
        self.flash4 = False  # the unmasked pass by FlashAttention 4 instead (flash4.py), where installed and faster


_CURRENT = PaddingRows()


def padding_rows(aspect_ratio_mask: torch.Tensor, patches: int, padded: int) -> list[list[int]]:
    """Per image, its padding rows: the last ``padded - patches`` rows of each tile and every row of an unused tile.

    aspect_ratio_mask [n, tiles] (CPU, 0/1); ``patches`` = real rows per tile (patches + class token); ``padded`` =
    rows per tile after padding to a multiple of 8.
    """
    out = []
    for tiles in aspect_ratio_mask.tolist():
        rows: list[int] = []
        for t, used in enumerate(tiles):
            start = t * padded
            rows.extend(range(start + (patches if used else 0), start + padded))
        out.append(rows)
    return out


def split_mask_attention(
    module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
    dropout: float = 0.0, scaling: float | None = None, **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query/key/value [n, heads, L, d] -> ([n, L, heads, d], None), as transformers' attention functions."""
    rows, key_bias = _CURRENT.rows, _CURRENT.key_bias
    if rows is None or key_bias is None or rows.shape[0] != query.shape[0]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if _CURRENT.flash4:  # [n, L, heads, d] as the q/k/v GEMM lays them out, and out in the layout o reads
        out = flash4.attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scaling)
        out = out.transpose(1, 2)
    elif _CURRENT.backends is None:
        out = F.scaled_dot_product_attention(query, key, value, scale=scaling)
    else:
        with sdpa_kernel(_CURRENT.backends):
            out = F.scaled_dot_product_attention(query, key, value, scale=scaling)
    if rows.shape[1]:
        n, heads, _, d = query.shape
        index = rows[:, None, :, None].expand(n, heads, rows.shape[1], d)
        # cuDNN's kernel takes this pass in 0.2 ms a layer for 8 images on an H200; as plain matmuls (scores,
        # softmax, weighted sum) 1.2 ms (bench/results/engine_tower_probe_run2_h200.json)
        pad = F.scaled_dot_product_attention(torch.gather(query, 2, index), key, value, attn_mask=key_bias,
                                             scale=scaling)
        out.scatter_(2, index, pad)
    return out.transpose(1, 2).contiguous(), None  # no copy after FlashAttention 4


AttentionInterface.register(ATTENTION_NAME, split_mask_attention)


class VisionEncoder:
    """Vision tower + projector: pixel values -> [n, tiles * padded rows, text hidden] image states."""

    def __init__(self, vision: Any, projector: Any, split_mask: bool) -> None:
        self.vision, self.projector = vision, projector
        self.patches = int(vision.num_patches)  # per tile, with the class token
        self.padded = self.patches + (8 - self.patches % 8) % 8
        self.split_mask = split_mask
        self.backends: list[SDPBackend] | None = None
        self.flash4 = False
        # tower.py's encoder layers (needs the split mask's padding rows); ``fused`` says whether they run
        self.tower: FusedTower | None = None
        self.fused = False
        self._projector_weight: torch.Tensor | None = None  # its columns in the fused tower's order
        if split_mask:
            vision.config._attn_implementation = ATTENTION_NAME
            self.tower = FusedTower(vision, split_mask_attention)
            self.fused = True

    def __call__(self, pixel: torch.Tensor, ar_ids: torch.Tensor, ar_mask: torch.Tensor,
                 ar_mask_cpu: torch.Tensor) -> torch.Tensor:
        """pixel [n, 1, tiles, 3, px, px] and ar_ids/ar_mask on the device; ar_mask_cpu [n, 1, tiles] the same mask
        on the CPU (the padding rows are computed from it without waiting for the GPU)."""
        rows = key_bias = None
        if self.split_mask:
            host_rows, host_bias = self.host_rows(ar_mask_cpu.reshape(ar_mask_cpu.shape[0], -1), pixel.dtype)
            rows, key_bias = to_device(host_rows, pixel.device), to_device(host_bias, pixel.device)
        return self.forward(pixel, ar_ids, ar_mask, rows, key_bias)

    def forward(self, pixel: torch.Tensor, ar_ids: torch.Tensor, ar_mask: torch.Tensor, rows: torch.Tensor | None,
                key_bias: torch.Tensor | None) -> torch.Tensor:
        """The tower's device work alone, from inputs already on the device (what tower_graphs.py captures):
        ``rows``/``key_bias`` from ``host_rows`` (None without the split mask)."""
        if rows is not None:
            _CURRENT.rows, _CURRENT.key_bias = rows, key_bias
            _CURRENT.backends, _CURRENT.flash4 = self.backends, self.flash4
        try:
            if self.tower is not None and self.fused:
                padded, patches = self.tower(pixel, ar_ids)  # [n, media, tiles, padded rows, dim]
                n, media, tiles, height, width = padded.shape
                # the projector on contiguous rows (padding ones too), which are then dropped from its output
                out = F.linear(padded.view(-1, width), self._fused_projector_weight(), self.projector.bias)
                out = out.view(n, media * tiles, height, -1)[:, :, :patches]
                return out.reshape(n, media * tiles * patches, -1)
            states = self.vision(pixel_values=pixel, aspect_ratio_ids=ar_ids, aspect_ratio_mask=ar_mask)
        finally:
            _CURRENT.rows = _CURRENT.key_bias = _CURRENT.backends = None
            _CURRENT.flash4 = False
        states = states.last_hidden_state  # [n, 1, tiles, patches, dim]
        n, _, tiles, patches, _ = states.shape
        return self.projector(states).reshape(n, tiles * patches, -1)  # type: ignore[no-any-return]

    def padding_width(self, ar_mask: torch.Tensor) -> int:
        """The most padding rows of any image in ar_mask [n, tiles] (CPU, 0/1)."""
        tiles = ar_mask.shape[1]
        return max(self._padding_count(tiles, int(used)) for used in ar_mask.sum(dim=1).tolist())

    def row_widths(self, tiles: int) -> list[int]:
        """Every ``padding_width`` an image of up to ``tiles`` tiles can have (one per count of used tiles)."""
        return sorted({self._padding_count(tiles, used) for used in range(1, tiles + 1)})

    def _padding_count(self, tiles: int, used: int) -> int:
        return used * (self.padded - self.patches) + (tiles - used) * self.padded

    def host_rows(self, ar_mask: torch.Tensor, dtype: torch.dtype,
                  width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The split mask's inputs on the CPU from ar_mask [n, tiles]: each image's padding rows [n, width] (``width``
        at least ``padding_width``, default that; a shorter list repeats its last row, or row 0) and the key bias
        [n, 1, 1, tiles * padded] (0 for real keys, dtype min for padding keys)."""
        per_image = padding_rows(ar_mask, self.patches, self.padded)
        width = max(len(r) for r in per_image) if width is None else width
        rows = torch.tensor([r + [r[-1] if r else 0] * (width - len(r)) for r in per_image], dtype=torch.long)
        bias = torch.zeros(len(per_image), 1, 1, ar_mask.shape[1] * self.padded, dtype=dtype)
        for i, r in enumerate(per_image):
            bias[i, 0, 0, r] = torch.finfo(dtype).min
        return rows, bias

    def _fused_projector_weight(self) -> torch.Tensor:
        """The projector's weight with its columns in the fused tower's order (made at the first fused call, so a
        tower left on transformers' layers holds no copy)."""
        if self._projector_weight is None:
            assert self.tower is not None
            weight = self.projector.weight
            self._projector_weight = weight.detach()[:, self.tower.column_order().to(weight.device)].contiguous()
        return self._projector_weight


def to_device(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A CPU tensor onto ``device``, pinned first on CUDA: the copy is queued without the host waiting for the
    stream (a copy from pageable memory waits for the stream's earlier work, e.g. a tower still running)."""
    if torch.device(device).type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


FLASH4 = "flash-attn-4"
CANDIDATE_BACKENDS = {
    "flash": [SDPBackend.FLASH_ATTENTION],
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
}


def _random_images(images: int, tiles: int, size: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    pixel = torch.randn(images, 1, tiles, 3, size, size, device="cuda", dtype=dtype)
    ar_ids = torch.ones(images, 1, dtype=torch.long, device="cuda")
    ar_cpu = torch.ones(images, 1, tiles, dtype=torch.long)
    return pixel, ar_ids, ar_cpu.to("cuda"), ar_cpu


def _seconds(call: Callable[[], torch.Tensor]) -> float:
    """Seconds of one tower call after a first (kernel selection, attention plans)."""
    call()
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    start.record()
    call()
    end.record()
    torch.cuda.synchronize()
    return float(start.elapsed_time(end)) / 1000


def choose_backend(encoder: VisionEncoder, images: int, tiles: int, size: int, dtype: torch.dtype) -> dict[str, float]:
    """Time the tower on ``images`` 4-tile images with each unmasked-attention kernel; keep the fastest (CUDA) of
    those whose image states are within ``LAYERS_TOLERANCE`` of the tower's with torch's own SDPA choice.

    Candidates: PyTorch's SDPA kernels and, where the optional package is installed, FlashAttention 4 (flash4.py).
    Returns seconds per candidate (a kernel that cannot take these shapes or compile here is left out). The
    kernels differ by GPU and library version, so this is measured at start rather than assumed.
    """
    inputs = _random_images(images, tiles, size, dtype)
    candidates: dict[str, tuple[list[SDPBackend] | None, bool]] = {
        name: (backends, False) for name, backends in CANDIDATE_BACKENDS.items()}
    if flash4.available(inputs[0].device):
        candidates[FLASH4] = (None, True)

    def form(backends: list[SDPBackend] | None, use_flash4: bool) -> Callable[[int], Callable[[], torch.Tensor]]:
        def call() -> torch.Tensor:
            encoder.backends, encoder.flash4 = backends, use_flash4
            return encoder(*inputs)

        return lambda _images: call

    choice, timings = choose_fastest({name: form(*c) for name, c in candidates.items()}, [images], timer=_seconds,
                                     tolerance=LAYERS_TOLERANCE, reference=form(None, False))
    encoder.backends, encoder.flash4 = candidates[choice[images]] if timings else (None, False)
    return {name: seconds for name, [seconds] in timings.items()}


LAYERS_TOLERANCE = 2e-2  # relative L2 of the fused layers' states against transformers' (bf16: ~1e-2 between kernels)


def choose_layers(encoder: VisionEncoder, images: int, tiles: int, size: int, dtype: torch.dtype) -> dict[str, float]:
    """Time the tower on ``images`` 4-tile images with transformers' encoder layers and with tower.py's (CUDA);
    keep the fused ones if faster and within ``LAYERS_TOLERANCE`` of the others (kernel_choice.choose_fastest: a
    form that raises, e.g. a Triton kernel that does not compile here, is left out). Returns seconds per form."""
    if encoder.tower is None:
        return {}
    inputs = _random_images(images, tiles, size, dtype)

    def form(fused: bool) -> Callable[[int], Callable[[], torch.Tensor]]:
        def call() -> torch.Tensor:
            encoder.fused = fused
            return encoder(*inputs)

        return lambda _images: call

    choice, timings = choose_fastest({"transformers": form(False), "fused": form(True)}, [images], timer=_seconds,
                                     tolerance=LAYERS_TOLERANCE)
    encoder.fused = choice[images] == "fused"
    return {name: seconds for name, [seconds] in timings.items()}
