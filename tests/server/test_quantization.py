"""bitsandbytes quantization through the server's engine (BitsAndBytesConfig, never load_in_4bit=True).

bitsandbytes picks its CPU 4-bit path by processor feature (AVX512-BF16: weights repacked at the first
forward pass, which only some shapes survive). Each nf4 case runs on this machine's own path and on the
path forced either way through the feature test bitsandbytes itself uses, so the suite covers both paths
whatever CPU runs it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ._support import make_settings

pytest.importorskip("bitsandbytes")
pytest.importorskip("accelerate")


def native_avx512_bf16() -> bool:
    from llamactl.server.quant_support import cpu_packs_nf4

    return cpu_packs_nf4()


@pytest.fixture(params=["native", "packed", "unpacked"])
def cpu_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[bool]:
    """Whether bitsandbytes (and so the engine) takes the packed AVX512-BF16 CPU path in this case."""
    from bitsandbytes.nn import modules

    if request.param == "native":
        yield native_avx512_bf16()
        return
    packed = request.param == "packed"
    monkeypatch.setattr(modules, "has_avx512bf16", lambda: packed)
    yield packed


def _answer(engine: Any) -> None:
    from llamactl.server.engine import GenParams, GenRequest
    from llamactl.server.tiny import trained_image, trained_messages

    req = GenRequest(
        engine.render_prompt(trained_messages()), trained_image("blue"), GenParams(max_new_tokens=80)
    )
    result = engine.generate_batch([req])[0]
    assert result.text.startswith("<SUMMARY>") and result.completion_tokens > 10


@pytest.mark.parametrize(("out_features", "in_features"), [(64, 64), (32, 128), (32, 32), (64, 32), (64, 96)])
def test_shape_rule_matches_bitsandbytes_packing(out_features: int, in_features: int) -> None:
    """``packs_on_cpu`` says exactly which weights bitsandbytes' packing step accepts (a pure tensor
    transformation: it runs on any CPU)."""
    import torch
    from bitsandbytes import functional as F

    from llamactl.server.quant_support import Linear, packs_on_cpu

    weight = torch.randn(out_features, in_features, dtype=torch.bfloat16)
    packed, state = F.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
    try:
        F._convert_weight_packed_for_cpu(packed, state)
        accepted = True
    except (RuntimeError, AssertionError):
        accepted = False
    assert accepted is packs_on_cpu(Linear("w", out_features, in_features))


@pytest.mark.slow
def test_nf4_loads_and_answers_on_either_cpu_path(tiny_checkpoint: Path, cpu_path: bool,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    from bitsandbytes import functional as F

    from llamactl.server.hf_engine import HFEngine

    engine = HFEngine(make_settings(tiny_checkpoint, quantization="nf4"))
    with caplog.at_level("WARNING", logger="llamactl.server.engine"):
        engine.load()
    lm = engine.model.model
    assert type(lm.language_model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    vision_q = lm.vision_model.transformer.layers[0].self_attn.q_proj  # 32x32: no packed block fits
    kept = [r.getMessage() for r in caplog.records if "kept unquantized" in r.getMessage()]
    if cpu_path:
        assert type(vision_q).__name__ == "Linear"
        assert type(lm.vision_model.transformer.layers[0].mlp.fc2).__name__ == "Linear4bit"  # 32x64 fits
        assert type(lm.multi_modal_projector).__name__ == "Linear"
        assert kept == [("nf4: 16 linear layer(s) kept unquantized, their shapes do not fit bitsandbytes' packed "
                         "AVX512-BF16 CPU kernels (output features a multiple of 32, input features a multiple "
                         "of 64) (model.multi_modal_projector: 1, model.vision_model: 15)")]
        # What failed at the first request before: every quantized weight must survive the repacking.
        for name, module in engine.model.named_modules():
            if type(module).__name__ == "Linear4bit":
                F._convert_weight_packed_for_cpu(module.weight.data.clone(), copy.deepcopy(module.weight.quant_state))
    else:
        assert type(vision_q).__name__ == "Linear4bit" and kept == []
    if cpu_path and not native_avx512_bf16():
        engine.close()  # the packed kernels themselves exist only on CPUs with the feature
        return
    engine.warmup()
    assert engine.state == "ready"
    _answer(engine)
    engine.close()


@pytest.mark.slow
def test_int8_loads_and_answers(tiny_checkpoint: Path) -> None:
    from llamactl.server.hf_engine import HFEngine

    engine = HFEngine(make_settings(tiny_checkpoint, quantization="int8"))
    engine.load()
    engine.warmup()
    assert engine.state == "ready"
    assert type(engine.model.model.language_model.layers[0].self_attn.q_proj).__name__ == "Linear8bitLt"
    # the vision tower and projector stay unquantized (bitsandbytes' CPU int8 path takes 2-D/3-D inputs only)
    vision = engine.model.model.vision_model.transformer.layers[0].self_attn.q_proj
    assert type(vision).__name__ == "Linear" and type(engine.model.model.multi_modal_projector).__name__ == "Linear"
    _answer(engine)
    engine.close()
