"""Build a tiny, random-weight Llama 3.2 Vision checkpoint for tests, the lab and demos.

The checkpoint has the real model's architecture class (``MllamaForConditionalGeneration``), the real file
layout, the real special tokens in their real order, a chat template that writes the real prompt format and the
Pillow-only image processor, so the server loads and runs it through exactly the calls it uses for the 11B model.
A few seconds of training teach it to answer a known prompt in the four CoT stages, with a caption that depends
on the image, so tests see real tags and a live image path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

# The Llama 3 special tokens, in the order (and with the names) of the real tokenizer. Only the first eleven
# are kept: the real vocabulary pads the range with ~245 reserved tokens a tiny model has no use for.
SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
)
IMAGE_TOKEN = "<|image|>"
TEXT_VOCAB_SIZE = (
    512  # BPE tokens + SPECIAL_TOKENS; <|image|> takes id TEXT_VOCAB_SIZE, as 128256 does in 11B
)
TILE_PX = 56
LEARNING_RATE = 1e-2

# The question the tiny model is trained to answer, and the images it was trained on (with their captions).
TRAINED_QUESTION = "What is in this image?"
TRAINED_COLOURS = (("red", (220, 30, 30)), ("blue", (30, 60, 220)))

# The prompt format of Llama 3.2 Vision Instruct, written from its documented behaviour: a system block (with the
# knowledge/today dates) only when no message carries an image, and an error for a system message with an image.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- if messages[0]['content'] is string %}{%- set system_message = messages[0]['content'] | trim %}"
    "{%- else %}{%- set system_message = messages[0]['content'][0]['text'] | trim %}{%- endif %}"
    "{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{%- set ns = namespace(has_images=false) %}"
    "{%- for message in messages %}{%- if message['content'] is not string %}"
    "{%- for part in message['content'] %}{%- if part['type'] == 'image' %}{%- set ns.has_images = true %}"
    "{%- endif %}{%- endfor %}{%- endif %}{%- endfor %}"
    "{%- if ns.has_images and system_message != '' %}"
    "{{- raise_exception('Prompting with images is incompatible with system messages.') }}"
    "{%- endif %}"
    "{%- if not ns.has_images %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}"
    "{{- 'Today Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] | trim }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}{{- '<|image|>' }}"
    "{%- elif part['type'] == 'text' %}{{- part['text'] | trim }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def trained_answer(colour: str) -> str:
    """The staged answer the tiny model learns for ``TRAINED_QUESTION`` about a plain ``colour`` image."""
    return (
        "<SUMMARY>I will look at the image and describe it.</SUMMARY>"
        f"<CAPTION>The image is a plain {colour} square.</CAPTION>"
        "<REASONING>1. The image has one colour.\n2. The colour is "
        f"{colour}.</REASONING>"
        f"<CONCLUSION>It is a {colour} square.</CONCLUSION>"
    )


def trained_image(colour: str) -> Image.Image:
    """A plain image of one of ``TRAINED_COLOURS`` (what the tiny model was trained on)."""
    from PIL import Image

    rgb = dict(TRAINED_COLOURS)[colour]
    return Image.new("RGB", (TILE_PX, TILE_PX), rgb)


def trained_messages() -> list[dict[str, Any]]:
    """The chat messages of the trained prompt: one image, then ``TRAINED_QUESTION``."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": TRAINED_QUESTION}]}]


def _train_tokenizer() -> Any:
    """A byte-level BPE whose merges cover the CoT tags and the trained answers, plus the special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TEXT_VOCAB_SIZE - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [trained_answer(c) for c, _ in TRAINED_COLOURS] * 20
    corpus += [
        TRAINED_QUESTION,
        "user assistant system Cutting Knowledge Date: December 2023 Today Date:",
    ] * 10
    corpus += [
        "The quick brown fox jumps over the lazy dog. A picture of a cat, a dog, a tree and a house.",
        "Summary caption reasoning conclusion. Describe the image. What colour is it? How many are there?",
        "Step 1: count the objects. Step 2: compare their sizes. Therefore the answer is three apples.",
        "People walk along the street near a small shop; cars wait at the light while birds fly overhead.",
        "Green grass, yellow flowers, white clouds, black shoes, orange fruit, purple shirt, grey stone wall.",
        "Question: which animal is larger? Answer: the elephant, because it stands taller than the horse.",
        "There is a table with two cups, a plate of bread, some water, and a bowl of soup in the kitchen.",
        "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 2024; left, right, top, bottom, middle, front, behind, inside.",
    ] * 5
    tok.train_from_iterator(corpus, trainer=trainer)
    if tok.get_vocab_size() != TEXT_VOCAB_SIZE - len(SPECIAL_TOKENS):  # the corpus must saturate the merges
        raise RuntimeError(f"tiny tokenizer has {tok.get_vocab_size()} tokens")
    tok.add_special_tokens([*SPECIAL_TOKENS, IMAGE_TOKEN])
    bos = SPECIAL_TOKENS[0]
    # Like the real Llama 3 tokenizer: BOS is added on encode, so prompts from the chat template (which already
    # start with BOS) must be tokenized with add_special_tokens=False.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return tok


def _configs() -> tuple[Any, Any]:
    from transformers import GenerationConfig, MllamaConfig

    ids = {t: TEXT_VOCAB_SIZE - len(SPECIAL_TOKENS) + i for i, t in enumerate(SPECIAL_TOKENS)}
    eos = [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]]
    pad = ids["<|finetune_right_pad_id|>"]
    text = {
        "vocab_size": TEXT_VOCAB_SIZE,
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "cross_attention_layers": [1, 3],
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "max_position_embeddings": 4096,
        "bos_token_id": ids["<|begin_of_text|>"],
        "eos_token_id": eos,
        "pad_token_id": pad,
    }
    vision = {
        "hidden_size": 32,
        "attention_heads": 2,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_global_layers": 1,
        "intermediate_layers_indices": [0, 1],
        "vision_output_dim": 32 * 3,  # last hidden state concatenated with the two intermediate ones
        "image_size": TILE_PX,
        "patch_size": 14,
        "max_num_tiles": 4,
    }
    config = MllamaConfig(vision_config=vision, text_config=text, image_token_index=TEXT_VOCAB_SIZE)
    # What the real Instruct checkpoint ships; callers pass explicit parameters (greedy or sampled) anyway.
    gen = GenerationConfig(  # type: ignore[no-untyped-call]
        bos_token_id=ids["<|begin_of_text|>"],
        eos_token_id=eos,
        pad_token_id=pad,
        do_sample=True,
        temperature=0.6,
        top_p=0.9,
    )
    return config, gen


def _train(model: Any, processor: Any, steps: int) -> None:
    """Teach the fixed prompt -> staged answer mapping, one answer per training colour (few seconds on CPU)."""
    import torch

    prompt = processor.apply_chat_template(trained_messages(), add_generation_prompt=True)
    colours = [c for c, _ in TRAINED_COLOURS]
    texts = [prompt + trained_answer(c) + "<|eot_id|>" for c in colours]
    processor.tokenizer.padding_side = "right"
    batch = processor(
        images=[[trained_image(c)] for c in colours],
        text=texts,
        add_special_tokens=False,
        padding=True,
        return_tensors="pt",
    )
    prompt_len = len(processor.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    labels = batch["input_ids"].clone()
    labels[:, :prompt_len] = -100
    labels[batch["attention_mask"] == 0] = -100
    # The vision tower stays at its random init (no backward through it: a third of the cost); the projector,
    # cross-attention and text layers learn to read its features.
    model.model.vision_model.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0)
    # Short warm-up, then linear decay to zero: settles the memorised answer within few steps.
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * max(0.0, 1.0 - i / steps)
    )
    model.train()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    model.requires_grad_(True)


def build_tiny_checkpoint(out_dir: Path, seed: int = 0, train_steps: int = 100) -> Path:
    """Write the tiny checkpoint into ``out_dir`` (created if missing) and return it.

    Deterministic: the same seed on the same software gives the same files and the same outputs.
    """
    import torch
    from transformers import (
        MllamaForConditionalGeneration,
        MllamaImageProcessorPil,
        MllamaProcessor,
        PreTrainedTokenizerFast,
    )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=_train_tokenizer(),
        bos_token=SPECIAL_TOKENS[0],
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        model_input_names=["input_ids", "attention_mask"],
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
    )
    image_processor = MllamaImageProcessorPil(size={"height": TILE_PX, "width": TILE_PX}, max_image_tiles=4)
    processor = MllamaProcessor(  # type: ignore[no-untyped-call]
        image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
    )

    config, gen = _configs()
    state, threads = torch.random.get_rng_state(), torch.get_num_threads()
    try:
        # One thread: the matrices are tiny (threads buy nothing), results cannot depend on the core count, and
        # on a busy machine OpenMP workers spinning for a descheduled peer made builds 30x slower.
        torch.set_num_threads(1)
        torch.manual_seed(seed)
        model = MllamaForConditionalGeneration(config)
        with torch.no_grad():  # open the cross-attention gates (zero at init) so the text sees the image
            for name, param in model.named_parameters():
                if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                    param.fill_(1.0)
        _train(model, processor, train_steps)
    finally:
        torch.random.set_rng_state(state)
        torch.set_num_threads(threads)
    model.generation_config = gen
    processor.tokenizer.padding_side = "right"  # as the real tokenizer; batching callers switch to left
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    _mirror_real_layout(out_dir, image_processor)
    return out_dir


def _mirror_real_layout(out_dir: Path, image_processor: Any) -> None:
    """Rewrite what transformers 5 saved into the layout of the published checkpoint.

    The hub checkpoint has ``preprocessor_config.json`` (image processor + processor class), a
    ``PreTrainedTokenizerFast`` tokenizer config and ``special_tokens_map.json``, not the newer
    ``processor_config.json``; loading that layout is what the server must handle. JSON is rewritten with sorted
    keys so the bytes do not depend on dict insertion order, and every file is made world-readable (the lab
    copies the directory to hosts where the service user differs).
    """
    (out_dir / "processor_config.json").unlink(missing_ok=True)
    pre = image_processor.to_dict()
    pre["processor_class"] = "MllamaProcessor"
    _write_json(out_dir / "preprocessor_config.json", pre)
    tok_cfg = json.loads((out_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    tok_cfg.pop("backend", None)
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    _write_json(out_dir / "tokenizer_config.json", tok_cfg)
    special = {k: tok_cfg[k] for k in ("bos_token", "eos_token", "pad_token")}
    _write_json(out_dir / "special_tokens_map.json", special)
    for path in sorted(out_dir.iterdir()):
        if path.suffix == ".json":
            _write_json(path, json.loads(path.read_text(encoding="utf-8")))
        path.chmod(0o644)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
