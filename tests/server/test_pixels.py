"""Image preparation: pixels.py's table equals transformers' Mllama processor bit for bit, the continuous engine
prepares the same inputs either way, and image work runs in the server's own image threads."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor
from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

from llamactl.server import images as images_module
from llamactl.server.engine.continuous import ContinuousEngine
from llamactl.server.engine.continuous.pixels import FastPixels, image_token_mask, prompt_ids
from llamactl.server.engine.protocol import GenParams, GenRequest
from llamactl.server.inference import image_thread_count

from ._support import make_settings, png_b64, start_thread_server

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]  # the 11B's
SIZES = [(1120, 1120), (800, 600), (300, 1500), (2000, 700), (1700, 1121), (560, 561), (57, 3), (1, 1)]


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def processor(tiny_checkpoint: Path) -> Any:
    return AutoProcessor.from_pretrained(tiny_checkpoint)


def eleven_b_images() -> MllamaImageProcessorPil:
    """The 11B checkpoint's image settings: 560-pixel tiles, up to 4, CLIP's mean and std."""
    return MllamaImageProcessorPil(size={"height": 560, "width": 560}, image_mean=CLIP_MEAN, image_std=CLIP_STD)


@pytest.mark.parametrize("which", ["tiny", "11b"])
def test_fast_pixels_equal_the_processor_bit_for_bit(processor: Any, which: str) -> None:
    images = processor.image_processor if which == "tiny" else eleven_b_images()
    fast = FastPixels.for_processor(images, torch.float32)
    assert fast is not None
    for i, (w, h) in enumerate(SIZES):
        image = noise(w, h, seed=i)
        ref = images(images=[[image]], return_tensors="pt")
        pixel, ids, mask, tiles = fast(image)
        assert pixel.dtype == torch.float32 and torch.equal(pixel, ref["pixel_values"]), (w, h)
        assert torch.equal(ids, ref["aspect_ratio_ids"]), (w, h)
        assert torch.equal(mask, ref["aspect_ratio_mask"]), (w, h)
        assert tiles == ref["num_tiles"][0][0], (w, h)


def test_fast_pixels_in_bfloat16_are_the_processors_values_rounded_once() -> None:
    images = eleven_b_images()
    fast = FastPixels.for_processor(images, torch.bfloat16)
    assert fast is not None
    image = noise(900, 1300, seed=7)
    pixel, *_ = fast(image)
    ref = images(images=[[image]], return_tensors="pt")["pixel_values"]
    assert pixel.dtype == torch.bfloat16 and torch.equal(pixel, ref.to(torch.bfloat16))


def test_fast_pixels_decline_what_they_do_not_reproduce(processor: Any) -> None:
    assert FastPixels.for_processor(MllamaImageProcessorPil(size={"height": 56, "width": 56}, do_normalize=False),
                                    torch.float32) is None
    assert FastPixels.for_processor(object(), torch.float32) is None  # another processor class
    fast = FastPixels.for_processor(processor.image_processor, torch.float32)
    assert fast is not None
    with pytest.raises(ValueError, match="RGB"):
        fast(Image.new("L", (60, 60)))


@pytest.mark.parametrize("prompt", [
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>Describe this.<|eot_id|>",
    "<|image|>no BOS after the image", "text first <|image|> then more", "<|image|><|begin_of_text|>x",
])
def test_prompt_ids_and_image_token_mask_equal_the_processor(processor: Any, prompt: str) -> None:
    image = noise(700, 300)
    ref = processor(images=[[image]], text=[prompt], add_special_tokens=False, return_tensors="pt")
    ids = prompt_ids(processor, prompt)
    assert ids == ref["input_ids"][0].tolist()
    fast = FastPixels.for_processor(processor.image_processor, torch.float32)
    assert fast is not None
    _, _, _, tiles = fast(image)
    mask = image_token_mask(ids, processor.image_token_id, tiles, fast.max_tiles)
    want = ref["cross_attention_mask"][0, :, 0, :]
    assert mask.dtype == want.dtype and torch.equal(mask, want)


def test_the_engine_prepares_the_same_inputs_with_the_table_or_the_processor(tiny_checkpoint: Path) -> None:
    eng = ContinuousEngine(make_settings(tiny_checkpoint))
    eng.hf.load()
    assert eng.describe()["image_pixels"].startswith("a table")

    def prepared(image: Image.Image) -> Any:
        req = GenRequest(prompt=eng.render_prompt([{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": "What is this?"}]}]), image=image,
            params=GenParams(max_new_tokens=8))
        eng.prepare(req)
        return req.prepared

    image = noise(333, 777, seed=3)
    fast = prepared(image)
    eng._pixels = None  # the processor's path
    slow = prepared(image)
    assert fast.input_ids == slow.input_ids
    for name in ("cross_mask", "pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"):
        a, b = getattr(fast, name), getattr(slow, name)
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), name
    assert eng.describe()["image_pixels"] == "the processor"
    grey = prepared(image.convert("L"))  # not RGB: the processor converts it its own way
    assert grey.pixel_values.shape == slow.pixel_values.shape


def test_image_thread_count() -> None:
    assert image_thread_count(5, 64) == 5  # as set
    assert image_thread_count(0, 12) == 3  # a quarter of the server's threads ...
    assert image_thread_count(0, 64) == 4  # ... at most 4
    assert image_thread_count(0, 4) == 2  # ... at least 2


def test_image_decoding_and_preparation_run_in_the_image_threads(tiny_checkpoint: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    srv = start_thread_server(make_settings(tiny_checkpoint, image_threads=3, max_batch_size=4))
    try:
        seen: dict[str, str] = {}
        engine = srv.state.engine
        prepare, decode = engine.prepare, images_module.decode_base64_image

        def preparing(req: GenRequest) -> None:
            if req.prepared is None:  # the work (the model thread only checks it is done)
                seen["prepare"] = threading.current_thread().name
            prepare(req)

        def decoding(*args: Any) -> Any:
            seen["decode"] = threading.current_thread().name
            return decode(*args)

        engine.prepare = preparing
        monkeypatch.setattr(images_module, "decode_base64_image", decoding)
        r = httpx.post(srv.url + "/infer", json={"image": png_b64("red"), "max_tokens": 4}, timeout=60)
        assert r.status_code == 200, r.text
        assert seen.keys() == {"prepare", "decode"}
        assert all(name.startswith("llamactl-image") for name in seen.values()), seen
        assert httpx.get(srv.url + "/health").json()["image_threads"] == 3
    finally:
        srv.stop()


def test_the_server_takes_pillows_image_processor_where_torchvision_would_be_the_default() -> None:
    """Pure logic, beside the real load above (the tiny checkpoint through HFEngine.load gets the table): the
    image processor is asked for with backend "pil" and handed to the processor as its component (a ``backend``
    argument to AutoProcessor would reach its tokenizer); a checkpoint without a Pillow variant keeps the default."""
    from llamactl.server.hf_engine import _pillow_image_processor

    calls: list[tuple[str, dict[str, Any]]] = []

    class Auto:
        @staticmethod
        def from_pretrained(model: str, **kwargs: Any) -> str:
            calls.append((model, kwargs))
            if model == "no-pillow":
                raise ValueError("no Pillow backend for this processor")
            return "pillow image processor"

    class Transformers:
        AutoImageProcessor = Auto

    assert _pillow_image_processor(Transformers, "m", {"revision": "abc"}) == {"image_processor": "pillow image processor"}
    assert calls == [("m", {"backend": "pil", "revision": "abc"})]
    assert _pillow_image_processor(Transformers, "no-pillow", {}) == {}
