"""The Mllama image processor's pixel values, in fewer passes over the image.

transformers' PIL-backend processor (the one a machine without torchvision gets) turns each image into float64,
then float32, pads, rescales, normalizes, splits into tiles and stacks, each a full pass over a new array:
12.4 ms for a 1120x1120 image on one core of the dev box, and with the JPEG decode 57.5 ms a request on the
H200 machine (bench/results/engine_burst_prep_probe_run2_h200.json). This makes the same values in 3.5 ms on the
dev box core, moving a fraction of the bytes; in a burst of 32 requests the images are ready sooner. (It did not
shorten the burst's TTFT: see bench/results/engine.md, Session 13.)

Here the same values come from the same resize (Pillow, on the uint8 image, as transformers does) and one table
lookup per byte: rescale and normalize map each of a channel's 256 byte values to one number, so the processor's
own ``rescale`` and ``normalize`` are applied once to the 256 values at start, and each byte is looked up as the
model dtype's bits straight into the (pinned) tile layout, in NumPy: single-threaded and mostly outside the GIL
(torch's intra-op pool, called from every image thread, would compete with the model thread for the cores).
Equal to the processor's output by construction; tests compare them bit for bit. Only the processor this reproduces is
served: any other processor class or setting takes the processor itself (``FastPixels.for_processor`` returns
None), and so does a non-RGB image (the engine's ``prepare`` checks).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

_REPRODUCED = "MllamaImageProcessorPil"


class FastPixels:
    """``__call__(image)`` -> (pixel_values [1, 1, max_tiles, 3, tile, tile], aspect_ratio_ids [1, 1],
    aspect_ratio_mask [1, 1, max_tiles], tiles), as ``MllamaImageProcessorPil`` makes them, pixel values cast to
    ``dtype`` (the processor's float32 values, rounded once)."""

    def __init__(self, processor: Any, dtype: torch.dtype) -> None:
        from transformers.models.mllama import image_processing_pil_mllama as pil_mllama

        self._fit = pil_mllama.get_image_size_fit_to_canvas
        self._canvas = pil_mllama.get_optimal_tiled_canvas
        self.tile = int(processor.size["height"])
        self.max_tiles = int(processor.max_image_tiles)
        self.resample = Image.Resampling(int(processor.resample))
        self.supported = list(pil_mllama.get_all_supported_aspect_ratios(self.max_tiles))
        self.dtype = dtype
        # every byte value of every channel through the processor's own rescale and normalize: [3, 256]
        values = np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 1, 256)).copy()
        table = processor.normalize(processor.rescale(values, processor.rescale_factor),
                                    processor.image_mean, processor.image_std)
        scaled = torch.from_numpy(np.ascontiguousarray(table.reshape(3, 256), dtype=np.float32)).to(dtype)
        # the same values as raw bits, for NumPy (no bfloat16 there): lookups and copies single-threaded and
        # mostly outside the GIL, never in torch's intra-op pool (its threads would compete with the model thread's)
        self._bits_type = {2: torch.int16, 4: torch.int32, 8: torch.int64}[scaled.element_size()]
        self.bits = scaled.view(self._bits_type).numpy()

    @classmethod
    def for_processor(cls, processor: Any, dtype: torch.dtype) -> FastPixels | None:
        """A fast path equal to ``processor``, or None where this module does not reproduce it."""
        if type(processor).__name__ != _REPRODUCED:
            return None
        if not (processor.do_resize and processor.do_pad and processor.do_rescale and processor.do_normalize
                and processor.do_convert_rgb):
            return None
        if processor.size.get("height") != processor.size.get("width"):
            return None
        return cls(processor, dtype)

    def tiling(self, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(tiles down, tiles across) and the resized (height, width), as the processor chooses them."""
        canvas_h, canvas_w = self._canvas(height, width, self.max_tiles, self.tile)
        new_h, new_w = self._fit(height, width, canvas_h, canvas_w, self.tile)
        return (int(canvas_h) // self.tile, int(canvas_w) // self.tile), (int(new_h), int(new_w))

    def __call__(self, image: Image.Image, pin: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        if image.mode != "RGB":
            raise ValueError(f"FastPixels takes RGB images, not {image.mode}")
        (down, across), (new_h, new_w) = self.tiling(image.height, image.width)
        if (new_w, new_h) != image.size:
            image = image.resize((new_w, new_h), resample=self.resample)
        t = self.tile
        tiles = down * across
        height, width = down * t, across * t
        # [h, w, 3] uint8; tobytes holds the GIL for ~0.5 ms where np.asarray(image) held it for ~3.4 ms (dev box)
        pixels = np.frombuffer(image.tobytes(), dtype=np.uint8).reshape(new_h, new_w, 3)
        # the canvas, channels first; its padding is byte value 0 (the processor pads before it rescales)
        canvas = np.empty((3, height, width), dtype=self.bits.dtype)
        if (new_h, new_w) != (height, width):
            canvas[...] = self.bits[:, :1, None]
        for c in range(3):  # each byte through its channel's table
            np.take(self.bits[c], pixels[..., c], out=canvas[c, :new_h, :new_w], mode="wrap")
        out = torch.empty((1, 1, self.max_tiles, 3, t, t), dtype=self.dtype, pin_memory=pin)
        bits = out.view(self._bits_type).numpy()
        bits[0, 0, tiles:] = 0
        # tiles in row-major order: [3, down, t, across, t] -> [down, across, 3, t, t]
        bits[0, 0, :tiles].reshape(down, across, 3, t, t)[...] = (
            canvas.reshape(3, down, t, across, t).transpose(1, 3, 0, 2, 4))
        ids = torch.tensor([[self.supported.index((down, across)) + 1]], dtype=torch.int64)
        mask = torch.zeros((1, 1, self.max_tiles), dtype=torch.int64)
        mask[0, 0, :tiles] = 1  # tiles >= 1
        return out, ids, mask, tiles


def image_token_mask(input_ids: list[int], image_token_id: int, tiles: int, max_tiles: int) -> torch.Tensor:
    """[tokens, max_tiles]: which of the image's tiles each token attends to (one image), as the processor's
    ``cross_attention_mask[0, :, 0, :]``, by transformers' own functions."""
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense,
        get_cross_attention_token_mask,
    )

    sparse = [get_cross_attention_token_mask(input_ids, image_token_id)]
    dense = convert_sparse_cross_attention_mask_to_dense(sparse, num_tiles=[[tiles]], max_num_tiles=max_tiles,
                                                         length=len(input_ids))
    return torch.from_numpy(dense)[0, :, 0, :]


def prompt_ids(processor: Any, prompt: str) -> list[int]:
    """The processor's input ids for one prompt with one image, without its image work: its own text
    normalization (a BOS after leading image tokens), then its tokenizer without special tokens."""
    from transformers.models.mllama.processing_mllama import build_string_from_input

    text = build_string_from_input(prompt, processor.bos_token, processor.image_token)
    return [int(t) for t in processor.tokenizer(text, add_special_tokens=False)["input_ids"]]
