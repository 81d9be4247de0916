"""bitsandbytes quantization through the server's engine (BitsAndBytesConfig, never load_in_4bit=True)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ._support import make_settings

pytest.importorskip("bitsandbytes")
pytest.importorskip("accelerate")


@pytest.mark.slow
@pytest.mark.parametrize(("quantization", "layer"), [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_quantized_engine_loads_and_answers(tiny_checkpoint: Path, quantization: str, layer: str) -> None:
    from llamactl.server.engine import GenParams, GenRequest
    from llamactl.server.hf_engine import HFEngine
    from llamactl.server.tiny import trained_image, trained_messages

    engine = HFEngine(make_settings(tiny_checkpoint, quantization=quantization))
    engine.load()
    engine.warmup()
    assert engine.state == "ready"
    text_layer = engine.model.model.language_model.layers[0].self_attn.q_proj
    assert type(text_layer).__name__ == layer
    if quantization == "int8":  # the vision tower stays unquantized (int8 fails there on CPU)
        vision = engine.model.model.vision_model.transformer.layers[0].self_attn.q_proj
        assert type(vision).__name__ == "Linear"
    req = GenRequest(
        engine.render_prompt(trained_messages()), trained_image("blue"), GenParams(max_new_tokens=80)
    )
    result = engine.generate_batch([req])[0]
    assert result.text.startswith("<SUMMARY>") and result.completion_tokens > 10
    engine.close()
