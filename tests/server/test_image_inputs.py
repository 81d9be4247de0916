"""llamactl's Mllama image inputs against transformers' processor: the same tensors, bit for bit.

Real processors: the tiny checkpoint's (56-pixel tiles) and one with Llama 3.2 Vision's own settings (560-pixel
tiles, CLIP mean and std) over the tiny tokenizer; images of every aspect ratio the tiler distinguishes, larger and
smaller than the canvas, and in other colour modes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from llamactl.server.engine.continuous.image_inputs import ImageInputs

PROMPT = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>What is here?<|eot_id|>"


def _processors(tiny_checkpoint: Path) -> dict[str, Any]:
    from transformers import AutoProcessor, MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    tiny = AutoProcessor.from_pretrained(tiny_checkpoint)
    llama = MllamaImageProcessorPil(
        size={"height": 560, "width": 560}, max_image_tiles=4,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    return {"tiny": tiny, "llama-3.2-vision": MllamaProcessor(llama, tiny.tokenizer)}


@pytest.fixture(scope="module")
def processors(tiny_checkpoint: Path) -> dict[str, Any]:
    return _processors(tiny_checkpoint)


def _image(width: int, height: int, mode: str, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    return rgb if mode == "RGB" else rgb.convert(mode)


SIZES = [(1120, 1120), (560, 560), (64, 64), (1, 1), (900, 300), (300, 900), (561, 1700), (2000, 1500),
         (1680, 560), (559, 2241)]


@pytest.mark.parametrize("name", ["tiny", "llama-3.2-vision"])
def test_inputs_equal_the_processors_bit_for_bit(processors: dict[str, Any], name: str) -> None:
    processor = processors[name]
    fast = ImageInputs.for_processor(processor)
    assert fast is not None
    tile = processor.image_processor.size.height
    for i, (w, h) in enumerate(SIZES):
        w, h = max(1, w * tile // 560), max(1, h * tile // 560)  # the same aspect ratios at this tile size
        for mode in ("RGB", "RGBA", "L", "P"):
            image = _image(w, h, mode, seed=i)
            ref = processor(images=[[image]], text=[PROMPT], add_special_tokens=False, return_tensors="pt")
            got = fast(image, PROMPT)
            for key, value in got.items():
                assert value.dtype == ref[key].dtype and torch.equal(value, ref[key]), (name, w, h, mode, key)
            bf16 = fast(image, PROMPT, dtype=torch.bfloat16)["pixel_values"]
            assert torch.equal(bf16, ref["pixel_values"].to(torch.bfloat16))  # one cast of the same values


def test_the_fast_path_is_refused_where_it_would_differ(processors: dict[str, Any]) -> None:
    from transformers import MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    tokenizer = processors["tiny"].tokenizer
    plain = MllamaImageProcessorPil(size={"height": 56, "width": 56}, max_image_tiles=4)
    assert ImageInputs.for_processor(MllamaProcessor(plain, tokenizer)) is not None
    no_normalize = MllamaImageProcessorPil(size={"height": 56, "width": 56}, max_image_tiles=4, do_normalize=False)
    assert ImageInputs.for_processor(MllamaProcessor(no_normalize, tokenizer)) is None
    assert ImageInputs.for_processor(object()) is None  # not an Mllama processor at all
    fast = ImageInputs(MllamaProcessor(plain, tokenizer))
    assert fast.arithmetic_matches()
    fast._divisor = 256.0  # arithmetic that differs on some pixel values: the start-time check catches it
    assert not fast.arithmetic_matches()
