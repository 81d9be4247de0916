"""Which layers stay unquantized, by device and CPU feature (pure: layer shapes in, skip list out)."""

from __future__ import annotations

import pytest

from llamactl.server.quant_support import INT8_SKIP, Linear, QuantizationUnsupported, packs_on_cpu, plan

# The tiny test checkpoint's shapes, one of each kind (text hidden 64, vision hidden 32, projector 96 -> 64).
TINY = [
    Linear("model.language_model.layers.0.self_attn.q_proj", 64, 64),
    Linear("model.language_model.layers.0.self_attn.k_proj", 32, 64),
    Linear("model.language_model.layers.0.mlp.down_proj", 64, 128),
    Linear("model.vision_model.transformer.layers.0.self_attn.q_proj", 32, 32),
    Linear("model.vision_model.transformer.layers.0.self_attn.k_proj", 32, 32),
    Linear("model.vision_model.transformer.layers.0.mlp.fc1", 64, 32),
    Linear("model.vision_model.transformer.layers.0.mlp.fc2", 32, 64),
    Linear("model.multi_modal_projector", 64, 96),
    Linear("lm_head", 512, 64),
]
# The 11B checkpoint: every quantized shape fits the packed layout (lm_head, 128264 rows, is never quantized).
REAL = [
    Linear("model.language_model.layers.0.self_attn.k_proj", 1024, 4096),
    Linear("model.language_model.layers.0.mlp.gate_proj", 14336, 4096),
    Linear("model.language_model.layers.0.mlp.down_proj", 4096, 14336),
    Linear("model.vision_model.transformer.layers.0.mlp.fc1", 5120, 1280),
    Linear("model.multi_modal_projector", 4096, 7680),
    Linear("lm_head", 128264, 4096),
]


@pytest.mark.parametrize(("out_features", "in_features", "fits"), [
    (64, 64, True), (32, 128, True), (32, 32, False), (64, 96, False), (48, 64, False), (128264, 4096, False),
])
def test_packed_layout_shapes(out_features: int, in_features: int, fits: bool) -> None:
    assert packs_on_cpu(Linear("x", out_features, in_features)) is fits


def test_nf4_on_a_packing_cpu_keeps_the_unfit_layers() -> None:
    chosen = plan("nf4", "cpu", TINY, cpu_packs=True)
    assert chosen.skip == (
        "model.vision_model.transformer.layers.0.self_attn",
        "model.vision_model.transformer.layers.0.mlp.fc1",
        "model.multi_modal_projector",
        "lm_head",
    )
    assert [l.name for l in chosen.kept] == [l.name for l in TINY if l.name.startswith(
        ("model.vision_model.transformer.layers.0.self_attn", "model.vision_model.transformer.layers.0.mlp.fc1",
         "model.multi_modal_projector"))]
    assert chosen.summary("nf4") == (
        "nf4: 4 linear layer(s) kept unquantized, their shapes do not fit bitsandbytes' packed AVX512-BF16 CPU "
        "kernels (output features a multiple of 32, input features a multiple of 64) "
        "(model.multi_modal_projector: 1, model.vision_model: 3)")


@pytest.mark.parametrize(("device", "cpu_packs"), [("cpu", False), ("cuda", True), ("cuda", False)])
def test_nf4_elsewhere_quantizes_everything(device: str, cpu_packs: bool) -> None:
    chosen = plan("nf4", device, TINY, cpu_packs=cpu_packs)
    assert chosen.skip is None and chosen.kept == ()


def test_nf4_real_model_needs_no_skip() -> None:
    assert plan("nf4", "cpu", REAL, cpu_packs=True).skip is None


def test_whole_vision_tower_collapses_to_one_prefix() -> None:
    vision = [l for l in TINY if "vision" in l.name and not l.name.endswith("fc2")]
    text = [l for l in TINY if "language" in l.name]
    assert plan("nf4", "cpu", vision + text, cpu_packs=True).skip == ("model.vision_model", "lm_head")


def test_nothing_left_to_quantize_is_refused() -> None:
    unfit = [Linear("model.a", 32, 32), Linear("model.b", 40, 64), Linear("lm_head", 512, 64)]
    with pytest.raises(QuantizationUnsupported) as caught:
        plan("nf4", "cpu", unfit, cpu_packs=True)
    assert str(caught.value) == (
        "nf4 on this CPU (AVX512-BF16, bitsandbytes' packed kernels): none of the model's 2 linear layers has "
        "output features a multiple of 32 and input features a multiple of 64 (e.g. model.a: 32x32); use "
        "quantization none, or a GPU")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_int8_keeps_vision_projector_and_head(device: str) -> None:
    assert plan("int8", device, TINY, cpu_packs=True).skip == INT8_SKIP
    assert plan("none", device, TINY, cpu_packs=True).skip is None
