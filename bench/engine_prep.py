"""The engine benchmark's first stage, in its own process: the checkpoint, then bare HF ``generate`` as reference.

1. build the checkpoint unless ``--model-dir`` has one: the 11B-shape random bf16 Mllama of gpu_smoke.py on a
   GPU, or the tiny CPU checkpoint (``llamactl model tiny``) with ``--tiny``;
2. bare ``generate`` (the method of shared/notes/gpu-baseline.md): the model built on the device from the
   checkpoint's config (random weights cost the same as real ones; building takes ~1 s, loading 21 GB longer),
   the checkpoint's processor, one prompt with one image per row (different 1120x1120 JPEGs), greedy,
   ``min_new_tokens = max_new_tokens``. Per batch size: a short warm run (the first run at a shape is 2-3x
   slower), a 1-token run (time to first token: vision + prefill), then the measured run. cuDNN SDPA is off,
   as in the hf engine (llamactl/server/hf_engine.py): with it, every decode step's new key length builds a
   cuDNN plan, which made a first H100 run of this baseline 2-4x slower than the server (engine_bench_run1).

Every result is printed at once as a ``PREP {json}`` line, so the parent keeps what finished if this process is
stopped at its time limit. Its GPU memory is returned when it exits, before any server starts.

    python bench/engine_prep.py --model-dir /dev/shm/llamactl-11b --batches 1,32 --tokens 128
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from engine_figures import bandwidth_for, of_roofline
from gpu_load import QUESTION, noise_jpeg


def emit(key: str, value: Any) -> None:
    print("PREP " + json.dumps({key: value}, default=str), flush=True)


def build(model_dir: Path, tiny: bool) -> dict[str, Any]:
    if (model_dir / "config.json").exists():
        return {"reused": str(model_dir)}
    t0 = time.monotonic()
    if tiny:
        from llamactl.server.tiny import build_tiny_checkpoint

        build_tiny_checkpoint(model_dir)
        info: dict[str, Any] = {"built": "tiny"}
    else:
        from gpu_smoke import build_random_11b

        info = build_random_11b(model_dir)
    info["dir"] = str(model_dir)
    info["wall_s"] = round(time.monotonic() - t0, 1)
    return info


def decode(url: str) -> Any:
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")


def bare_generate(a: argparse.Namespace, deadline: float) -> None:
    import torch
    import transformers
    from transformers import AutoProcessor, MllamaConfig, MllamaForConditionalGeneration

    device = "cpu" if a.tiny else "cuda"
    dtype = torch.float32 if a.tiny else torch.bfloat16
    if device == "cuda" and not a.cudnn_sdp:
        torch.backends.cuda.enable_cudnn_sdp(False)
    processor = AutoProcessor.from_pretrained(a.model_dir)  # type: ignore[no-untyped-call]
    t0 = time.monotonic()
    if a.tiny:  # small: load the real file
        model = MllamaForConditionalGeneration.from_pretrained(a.model_dir, dtype=dtype)
    else:  # same config, random weights built on the GPU: ~1 s instead of loading 21 GB
        cfg = MllamaConfig.from_pretrained(a.model_dir)
        with torch.device(device):
            model = MllamaForConditionalGeneration._from_config(cfg, dtype=dtype)  # type: ignore[no-untyped-call]
    model.eval()  # type: ignore[no-untyped-call]
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else ""
    bw, bw_note = bandwidth_for(gpu)
    emit("baseline_info", {
        "device": gpu or f"CPU ({os.cpu_count()} CPUs)", "torch": torch.__version__, "cuda": torch.version.cuda,
        "transformers": transformers.__version__, "model_build_s": round(time.monotonic() - t0, 2),
        "dtype": str(dtype).removeprefix("torch."), "bandwidth_note": bw_note,
        "cudnn_sdp": bool(device == "cuda" and torch.backends.cuda.cudnn_sdp_enabled()),
    })
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
        add_generation_prompt=True)
    images = [decode(noise_jpeg(90_000 + i, a.side)) for i in range(max(a.batches))]

    def run(batch: int, new_tokens: int) -> dict[str, Any]:
        t = time.monotonic()
        inputs = processor(images=[[im] for im in images[:batch]], text=[prompt] * batch, return_tensors="pt")
        inputs = inputs.to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        prep_s = time.monotonic() - t
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.monotonic()
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        if device == "cuda":
            torch.cuda.synchronize()
        wall = time.monotonic() - t
        return {"wall_s": wall, "prep_s": prep_s, "new": int(out.shape[1] - inputs["input_ids"].shape[1]),
                "prompt_tokens": int(inputs["input_ids"].shape[1]),
                "peak_bytes": int(torch.cuda.max_memory_allocated()) if device == "cuda" else None}

    for batch in a.batches:
        if time.monotonic() > deadline:
            emit("baseline_run", {"batch": batch, "skipped": "out of time"})
            continue
        try:
            warm = run(batch, a.warm_tokens)
            first = run(batch, 1)
            r = run(batch, a.tokens)
        except Exception as exc:  # noqa: BLE001 - an OOM at a large batch is a result too
            emit("baseline_run", {"batch": batch, "error": f"{type(exc).__name__}: {exc}"[:300]})
            if device == "cuda":
                torch.cuda.empty_cache()
            continue
        tok_s = batch * r["new"] / r["wall_s"]
        emit("baseline_run", {
            "batch": batch, "new_tokens": r["new"], "prompt_tokens": r["prompt_tokens"],
            "wall_s": round(r["wall_s"], 3), "tok_per_s": round(tok_s, 1),
            "req_per_s": round(batch / r["wall_s"], 3), "ttft_s": round(first["wall_s"], 3),
            "warm_run_s": round(warm["wall_s"], 3), "processor_s": round(r["prep_s"], 3),
            "peak_bytes": r["peak_bytes"], "of_roofline": of_roofline(tok_s, batch, bw),
        })


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--tiny", action="store_true", help="CPU: tiny checkpoint, float32")
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",") if x], default=[1, 32])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--warm-tokens", type=int, default=8)
    ap.add_argument("--side", type=int, default=1120, help="image side in pixels (1120 = 4 tiles of 560)")
    ap.add_argument("--budget-s", type=float, default=180, help="no new baseline batch after this")
    ap.add_argument("--cudnn-sdp", action="store_true", help="leave cuDNN SDPA on (per-shape plans)")
    a = ap.parse_args()
    deadline = time.monotonic() + a.budget_s
    emit("build", build(a.model_dir, a.tiny))
    if a.batches:
        bare_generate(a, deadline)


if __name__ == "__main__":
    main()
