"""The continuous engine's vision tower (attention without the dense mask, tower.py's regrouped layers) equals
transformers' (tiny checkpoint, float32)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from llamactl.server.engine.continuous.tower import FusedTower
from llamactl.server.engine.continuous.vision import VisionEncoder, padding_rows
from llamactl.server.hf_engine import HFEngine

from ._support import make_settings


def test_padding_rows_are_each_tiles_tail_and_every_row_of_an_unused_tile() -> None:
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    rows = padding_rows(mask, patches=5, padded=8)
    assert rows[0] == [5, 6, 7, 13, 14, 15, *range(16, 32)]
    assert rows[1] == [5, 6, 7, 13, 14, 15, 21, 22, 23, 29, 30, 31]


def test_split_mask_vision_states_equal_transformers_for_images_of_different_tile_counts(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    hf = HFEngine(make_settings(tiny_checkpoint))
    hf.load()
    model = hf.model
    images = [Image.new("RGB", size, colour) for size, colour in
              (((112, 112), (200, 40, 40)), ((224, 56), (30, 160, 90)), ((56, 56), (20, 20, 220)))]
    prompt = "<|image|>What is this?"
    inputs = hf.processor(images=[[im] for im in images], text=[prompt] * 3, return_tensors="pt")
    ar_mask = inputs["aspect_ratio_mask"]
    assert sorted(int(m.sum()) for m in ar_mask) == [1, 4, 4]  # a square, a wide (4 x 1) and a one-tile image
    vision, projector = model.model.vision_model, model.model.multi_modal_projector
    towers: list[tuple[torch.Tensor, int]] = []  # what the fused tower hands the projector
    tower_call = FusedTower.__call__
    monkeypatch.setattr(FusedTower, "__call__", lambda self, *a: towers.append(tower_call(self, *a)) or towers[-1])
    with torch.inference_mode():
        states = vision(pixel_values=inputs["pixel_values"], aspect_ratio_ids=inputs["aspect_ratio_ids"],
                        aspect_ratio_mask=ar_mask).last_hidden_state
        n, _, tiles, patches, _ = states.shape
        ref = projector(states).reshape(n, tiles * patches, -1)
        encoder = VisionEncoder(vision, projector, split_mask=True)
        assert encoder.fused  # tower.py's encoder layers by default
        got = encoder(inputs["pixel_values"], inputs["aspect_ratio_ids"], ar_mask, ar_mask)
    # the tower's own output: transformers' states with the kept layers' columns in blocks (column_order)
    assert encoder.tower is not None and len(towers) == 1
    blocked, real = towers[0]
    assert real == patches
    want = states[..., encoder.tower.column_order()]
    assert torch.allclose(blocked[:, :, :, :patches], want, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(blocked[:, :, :, :patches], states, atol=1e-3)  # the order is not transformers'
    with torch.inference_mode():
        encoder.fused = False  # transformers' layers with the split-mask attention
        unfused = encoder(inputs["pixel_values"], inputs["aspect_ratio_ids"], ar_mask, ar_mask)
        plain = VisionEncoder(vision, projector, split_mask=False)
        # the dense-mask path (any caller that sets no padding rows) is transformers' own
        again = plain(inputs["pixel_values"], inputs["aspect_ratio_ids"], ar_mask, ar_mask)
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-4), float((got - ref).abs().max())
    assert torch.allclose(unfused, ref, atol=1e-5, rtol=1e-4), float((unfused - ref).abs().max())
    assert torch.allclose(again, ref, atol=1e-5, rtol=1e-4)
    # the padding rows' recompute matters: leave out the unused tiles' rows and the states differ
    encoder = VisionEncoder(vision, projector, split_mask=True)
    with torch.inference_mode():
        wrong = encoder(inputs["pixel_values"], inputs["aspect_ratio_ids"], ar_mask, torch.ones_like(ar_mask))
    assert not torch.allclose(wrong, ref, atol=1e-3)


def timed_tower(checkpoint: Path, image: Image.Image,
                monkeypatch: pytest.MonkeyPatch) -> tuple[VisionEncoder, tuple[torch.Tensor, ...]]:
    """The tiny checkpoint's tower (split mask) and ``image``'s inputs, which the start-time choices time on
    (in place of random GPU images)."""
    from llamactl.server.engine.continuous import vision as vision_mod

    hf = HFEngine(make_settings(checkpoint))
    hf.load()
    inputs = hf.processor(images=[[image]], text=["<|image|>What is this?"], return_tensors="pt")
    ar_mask = inputs["aspect_ratio_mask"]
    x = (inputs["pixel_values"], inputs["aspect_ratio_ids"], ar_mask, ar_mask)
    monkeypatch.setattr(vision_mod, "_random_images", lambda *a: x)
    encoder = VisionEncoder(hf.model.model.vision_model, hf.model.model.multi_modal_projector, split_mask=True)
    return encoder, x


def test_choose_layers_keeps_the_fused_layers_only_when_faster_and_working(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The start-time choice with the real tiny tower on the CPU and a stand-in clock: the faster form wins; a
    fused form that raises is left out."""
    from llamactl.server.engine.continuous import vision as vision_mod

    encoder, _ = timed_tower(tiny_checkpoint, Image.new("RGB", (112, 112), (200, 40, 40)), monkeypatch)
    for fused_s, want in ((0.5, True), (2.0, False)):
        monkeypatch.setattr(vision_mod, "_seconds", lambda call, s=fused_s: (call(), s if encoder.fused else 1.0)[1])
        with torch.inference_mode():
            timings = vision_mod.choose_layers(encoder, 1, 4, 112, torch.float32)
        assert encoder.fused is want and timings == {"transformers": 1.0, "fused": fused_s}
    assert encoder.tower is not None
    monkeypatch.setattr(encoder.tower, "_embed", lambda *a: (_ for _ in ()).throw(RuntimeError("no kernel")))
    monkeypatch.setattr(vision_mod, "_seconds", lambda call: (call(), 0.1)[1])
    with torch.inference_mode():
        timings = vision_mod.choose_layers(encoder, 1, 4, 112, torch.float32)
    assert encoder.fused is False and timings == {"transformers": 0.1}


def test_choose_backend_takes_flash_attention_4_only_where_installed_faster_and_equal(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The start-time choice of the unmasked pass's kernel with the real tiny tower on the CPU and a stand-in
    clock. FlashAttention 4 itself needs a Hopper GPU (bench/engine_vision_fa4_probe.py checks it there); here a
    stand-in with its contract (q/k/v and output [n, L, heads, d]) shows that the tower hands it that layout and
    uses what it returns, and that it is taken only when installed, faster, and equal to the reference."""
    import torch.nn.functional as F

    from llamactl.server.engine.continuous import flash4
    from llamactl.server.engine.continuous import vision as vision_mod

    encoder, x = timed_tower(tiny_checkpoint, Image.new("RGB", (224, 56), (30, 160, 90)), monkeypatch)
    vision, ar_mask = encoder.vision, x[2]
    with torch.inference_mode():
        ref = encoder(*x)
    calls: list[tuple[int, ...]] = []

    def stand_in(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
        calls.append(tuple(q.shape))
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              scale=scale).transpose(1, 2).contiguous()

    monkeypatch.setattr(vision_mod, "_seconds", lambda call: (call(), 0.5 if encoder.flash4 else 1.0)[1])
    monkeypatch.setattr(flash4, "attention", stand_in)
    monkeypatch.setattr(flash4, "available", lambda device: False)
    with torch.inference_mode():
        timings = vision_mod.choose_backend(encoder, 1, 4, 112, torch.float32)
    assert vision_mod.FLASH4 not in timings and not encoder.flash4 and not calls

    monkeypatch.setattr(flash4, "available", lambda device: True)
    with torch.inference_mode():
        timings = vision_mod.choose_backend(encoder, 1, 4, 112, torch.float32)
        got = encoder(*x)
    assert encoder.flash4 and timings[vision_mod.FLASH4] == 0.5 and min(timings.values()) == 0.5
    heads, length = vision.transformer.layers[0].self_attn.num_heads, ar_mask.shape[-1] * encoder.padded
    assert calls and set(calls) == {(1, length, heads, vision.config.hidden_size // heads)}
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-4)

    # a kernel whose states differ from the reference, or that fails (e.g. does not compile here), is left out
    for broken in (lambda q, k, v, scale: v.flip(1) * 10,  # other rows' values, scaled
                   lambda q, k, v, scale: (_ for _ in ()).throw(RuntimeError("no sm90 here"))):
        monkeypatch.setattr(flash4, "attention", broken)
        with torch.inference_mode():
            timings = vision_mod.choose_backend(encoder, 1, 4, 112, torch.float32)
        assert vision_mod.FLASH4 not in timings and not encoder.flash4 and timings


def test_flash_attention_4_is_not_offered_off_cuda_or_without_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from llamactl.server.engine.continuous import flash4

    assert not flash4.available("cpu")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert not flash4.available("cuda")
