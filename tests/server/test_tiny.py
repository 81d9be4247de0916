"""The tiny checkpoint through the exact transformers calls the server makes (real Mllama code path)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from PIL import Image

from llamactl.server import tiny

EXPECTED_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "preprocessor_config.json",
}


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint: Path) -> Path:
    """The session's seed-0 checkpoint (conftest), shared with the server tests."""
    return tiny_checkpoint


@pytest.fixture(scope="module")
def loaded(ckpt: Path) -> tuple[Any, Any]:
    os.environ["HF_HUB_OFFLINE"] = "1"
    processor = transformers.AutoProcessor.from_pretrained(ckpt)
    model = transformers.AutoModelForImageTextToText.from_pretrained(ckpt)
    model.eval()
    return processor, model


def _generate(processor: Any, model: Any, image: Image.Image, question: str, n: int = 90) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return str(processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_layout_matches_the_real_checkpoint(ckpt: Path) -> None:
    assert {p.name for p in ckpt.iterdir()} == EXPECTED_FILES
    total = sum(p.stat().st_size for p in ckpt.iterdir())
    assert total < 3_000_000
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in ckpt.iterdir())  # readable by a service user


def test_loads_with_auto_classes_and_pillow_processor(loaded: tuple[Any, Any]) -> None:
    processor, model = loaded
    assert type(model).__name__ == "MllamaForConditionalGeneration"
    assert type(processor.image_processor).__name__ == "MllamaImageProcessorPil"
    assert model.config.vision_config.image_size == tiny.TILE_PX
    assert model.config.vision_config.max_num_tiles == 4
    assert len(model.config.text_config.cross_attention_layers) == 2


def test_special_tokens_in_llama3_order(loaded: tuple[Any, Any]) -> None:
    processor, model = loaded
    tok = processor.tokenizer
    ids = tok.convert_tokens_to_ids(list(tiny.SPECIAL_TOKENS))
    assert ids == list(range(ids[0], ids[0] + len(tiny.SPECIAL_TOKENS)))
    assert ids[-1] == tiny.TEXT_VOCAB_SIZE - 1
    assert tok.convert_tokens_to_ids("<|image|>") == tiny.TEXT_VOCAB_SIZE == model.config.image_token_index
    assert model.config.text_config.vocab_size == tiny.TEXT_VOCAB_SIZE
    eos = set(model.generation_config.eos_token_id)
    assert eos == set(tok.convert_tokens_to_ids(["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]))
    # Like Llama 3: plain encoding adds BOS, so chat prompts (which carry BOS) need add_special_tokens=False.
    assert tok("hi")["input_ids"][0] == tok.bos_token_id
    assert tok("hi", add_special_tokens=False)["input_ids"][0] != tok.bos_token_id


def test_chat_template_real_prompt_format(loaded: tuple[Any, Any]) -> None:
    processor, _ = loaded
    prompt = processor.apply_chat_template(tiny.trained_messages(), add_generation_prompt=True)
    assert prompt == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>What is in this image?"
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    text_only = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    prompt = processor.apply_chat_template(text_only, add_generation_prompt=False)
    assert prompt == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>"
    )


def test_chat_template_rejects_system_message_with_image(loaded: tuple[Any, Any]) -> None:
    processor, _ = loaded
    messages = [{"role": "system", "content": "Be brief."}, *tiny.trained_messages()]
    with pytest.raises(Exception, match="incompatible with system messages"):
        processor.apply_chat_template(messages, add_generation_prompt=True)


def test_trained_prompt_gives_staged_answer_that_depends_on_the_image(loaded: tuple[Any, Any]) -> None:
    processor, model = loaded
    answers = {
        c: _generate(processor, model, tiny.trained_image(c), tiny.TRAINED_QUESTION)
        for c, _ in tiny.TRAINED_COLOURS
    }
    for colour, text in answers.items():
        assert text == tiny.trained_answer(colour)
    assert answers["red"] != answers["blue"]


def test_untrained_image_and_size_still_generate(loaded: tuple[Any, Any]) -> None:
    processor, model = loaded
    wide = Image.new("RGB", (400, 90), (10, 200, 10))  # several tiles
    text = _generate(processor, model, wide, "Describe it.", n=20)
    assert isinstance(text, str) and text


def test_batch_with_left_padding_equals_single_runs(loaded: tuple[Any, Any]) -> None:
    processor, model = loaded
    items = [
        (tiny.trained_image("red"), tiny.TRAINED_QUESTION),
        (
            Image.new("RGB", (120, 40), (30, 60, 220)),
            "A much longer question, so that the prompts differ in length?",
        ),
    ]
    singles = [_generate(processor, model, im, q, n=40) for im, q in items]
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
            add_generation_prompt=True,
        )
        for _, q in items
    ]
    processor.tokenizer.padding_side = "left"
    try:
        inputs = processor(
            images=[[im] for im, _ in items],
            text=prompts,
            padding=True,
            add_special_tokens=False,
            return_tensors="pt",
        )
    finally:
        processor.tokenizer.padding_side = "right"
    assert (inputs["attention_mask"][:, 0] == 0).any()  # really padded on the left
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=40, do_sample=False)
    width = inputs["input_ids"].shape[1]
    batched = [processor.decode(row[width:], skip_special_tokens=True) for row in out]
    assert batched == singles


def test_deterministic_for_a_seed(ckpt: Path, tmp_path: Path) -> None:
    if os.environ.get("LLAMACTL_TINY_CACHE"):
        pytest.skip("the session checkpoint may come from another software version")
    again = tiny.build_tiny_checkpoint(tmp_path / "again", seed=0)
    assert _digest(again) == _digest(ckpt)


def test_cli_builds_checkpoint_for_another_seed(ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "m"
    proc = subprocess.run(
        [sys.executable, "-m", "llamactl", "model", "tiny", str(out), "--seed", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert str(out.resolve()) in proc.stdout and "MB" in proc.stdout
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES
    assert _digest(out)["model.safetensors"] != _digest(ckpt)["model.safetensors"]
    assert _digest(out)["tokenizer.json"] == _digest(ckpt)["tokenizer.json"]  # trained on fixed text


def test_cli_rejects_a_file_as_directory(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    proc = subprocess.run(
        [sys.executable, "-m", "llamactl", "model", "tiny", str(target)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert "exists and is not a directory" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_every_valid_corpus_image_goes_through_the_processor_and_model(loaded: tuple[Any, Any]) -> None:
    """Decoded corpus images (1x1, 10000x3, photo, ...) are valid model input, not just valid RGB."""
    from llamactl.server.images import ImageLimits, decode_image
    from tests.fixtures.images import corpus

    processor, model = loaded
    prompt = processor.apply_chat_template(tiny.trained_messages(), add_generation_prompt=True)
    limits = ImageLimits(max_bytes=20_000_000, max_pixels=40_000_000)
    images = [decode_image(s.data, limits) for s in corpus.valid_samples()]
    inputs = processor(
        images=[[im] for im in images],
        text=[prompt] * len(images),
        padding=True,
        add_special_tokens=False,
        return_tensors="pt",
    )
    assert torch.isfinite(inputs["pixel_values"]).all()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == len(images)
