"""Why is the first batch at each new batch size ~10x slower on the GPU? Per-shape work in SDPA, or not.

Hypothesis: batched requests carry a left-padding attention mask, so SDPA cannot use flash attention and picks
the cuDNN backend on H100, which builds an execution plan per new shape. During decode every step has a new
key length, so the first batch of a given (batch size, prompt length) builds ~max_new_tokens plans; later
batches of the same shapes hit the plan cache. Real traffic (prompt lengths vary) would keep missing it.

Test, HF generate on the 11B-shape random model (direct, no server), fixed-length answers:
  A: default backends, batch B1: first run, second run (same shapes);
  B: cuDNN SDPA disabled, batch B2 (shapes never seen): first run, second run;
  C: cuDNN SDPA disabled, batch B1 again: is steady state as fast as A's second run?

    CUDA_VISIBLE_DEVICES=1 python3 bench/gpu_sdpa_check.py --out result.json
    python bench/gpu_sdpa_check.py --tiny-dir DIR     # CPU dry run on the tiny checkpoint
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch


def model_and_cfg(tiny_dir: Path | None) -> tuple[Any, Any, str]:
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    if tiny_dir is not None:
        return MllamaForConditionalGeneration.from_pretrained(tiny_dir), None, "cpu"
    cfg: Any = MllamaConfig()
    cfg.vision_config.image_size = 560
    cfg.image_token_index = 128256
    with torch.device("cuda"):
        model = MllamaForConditionalGeneration._from_config(cfg, dtype=torch.bfloat16)  # type: ignore[no-untyped-call]
    return model, cfg, "cuda"


def inputs(model: Any, batch: int, prompt_len: int, pad: int, device: str) -> dict[str, torch.Tensor]:
    """What the processor makes for one 2x2-tile image + text per row; row 0 left-padded by ``pad``."""
    cfg = model.config
    vc = cfg.vision_config
    tiles, side = vc.max_num_tiles, vc.image_size
    g = torch.Generator().manual_seed(batch * 1000 + prompt_len)
    ids = torch.randint(10, min(cfg.text_config.vocab_size, 128000) - 1, (batch, prompt_len), generator=g)
    ids[:, 1] = cfg.image_token_index
    mask = torch.ones(batch, prompt_len, dtype=torch.long)
    mask[0, :pad] = 0
    ids[0, :pad] = 0
    dtype = next(model.parameters()).dtype
    ratio = [tuple(r) for r in vc.supported_aspect_ratios].index((2, 2)) + 1
    return {
        "input_ids": ids.to(device), "attention_mask": mask.to(device),
        "pixel_values": torch.randn(batch, 1, tiles, 3, side, side, generator=g).to(device, dtype),
        "aspect_ratio_ids": torch.full((batch, 1), ratio, dtype=torch.long, device=device),
        "aspect_ratio_mask": torch.ones(batch, 1, tiles, dtype=torch.long, device=device),
        "cross_attention_mask": torch.ones(batch, prompt_len, 1, tiles, dtype=torch.long, device=device),
    }


def timed(model: Any, inp: dict[str, torch.Tensor], new: int, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.monotonic()
    with torch.inference_mode():
        out = model.generate(**inp, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    if device == "cuda":
        torch.cuda.synchronize()
    assert out.shape[1] == inp["input_ids"].shape[1] + new, out.shape
    return round(time.monotonic() - t0, 3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny-dir", type=Path)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=24)
    ap.add_argument("--b1", type=int, default=8)
    ap.add_argument("--b2", type=int, default=12)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    model, _, device = model_and_cfg(a.tiny_dir)
    model.eval()
    n, L = a.new_tokens, a.prompt_len
    backends: Any = torch.backends.cuda  # untyped module functions
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
                           "torch": torch.__version__, "new_tokens": n, "prompt_len": L,
                           "backends_default": {"cudnn": backends.cudnn_sdp_enabled(),
                                                "flash": backends.flash_sdp_enabled(),
                                                "mem_efficient": backends.mem_efficient_sdp_enabled()}}
    timed(model, inputs(model, 1, 16, 0, device), 4, device)  # load kernels, allocator: not the question
    res["A_default_b1_first_s"] = timed(model, inputs(model, a.b1, L, 3, device), n, device)
    res["A_default_b1_second_s"] = timed(model, inputs(model, a.b1, L, 3, device), n, device)
    res["A_default_b1_newprompt_s"] = timed(model, inputs(model, a.b1, L + 5, 3, device), n, device)
    print(json.dumps(res), flush=True)
    torch.backends.cuda.enable_cudnn_sdp(False)
    res["B_nocudnn_b2_first_s"] = timed(model, inputs(model, a.b2, L + 2, 3, device), n, device)
    res["B_nocudnn_b2_second_s"] = timed(model, inputs(model, a.b2, L + 2, 3, device), n, device)
    res["C_nocudnn_b1_s"] = timed(model, inputs(model, a.b1, L, 3, device), n, device)
    res["C_nocudnn_b1_newprompt_s"] = timed(model, inputs(model, a.b1, L + 9, 3, device), n, device)
    text = json.dumps(res, indent=2)
    print(text, flush=True)
    if a.out:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
