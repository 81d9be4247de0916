"""The continuous engine without HTTP: teacher-forced logits vs transformers, then closed-loop throughput.

On the GPU machine (11B shape, random bf16 weights built in memory; cross-attention gates set non-zero so the
image matters to the logits):
1. logits check: for several batch compositions (rows with and without images, different prompt lengths and
   tiles), the engine's prefill + decode logits, fed the same tokens, against transformers' eager forward of
   each row alone (bf16): relative L2 distance per position, and how many greedy tokens agree;
2. bare HF generate at batch 1 and 32 (the reference of gpu-baseline.md, same call);
3. closed-loop load straight into the engine at concurrency 1, 8, 32, 64: 1120x1120 images (4 tiles), 128-token
   answers (min = max); output tok/s, TTFT and inter-token latency percentiles, peak GPU memory.
Prompts and images are prepared before each level (the processor's CPU time is not in these figures; the HTTP
bench measures that path). Writes JSON to --out and prints a table.

    python3 bench/engine_direct.py --out $OUT/engine_direct.json           # GPU
    python3 bench/engine_direct.py --tiny --out /tmp/engine_direct.json    # CPU check with the tiny model
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


def build(tiny: bool, slots: int, max_new: int, compile_: str = "off", quantization: str = "none") -> tuple[Any, Any]:
    from llamactl.server.engine.continuous import ContinuousEngine
    from llamactl.server.settings import Settings

    if tiny:
        from llamactl.server.tiny import build_tiny_checkpoint

        path = Path("/tmp/engine-direct-tiny")
        if not (path / "config.json").exists():
            build_tiny_checkpoint(path)
        settings = Settings(model=str(path), device="cpu", max_batch_size=slots, gen_max_new_tokens=max_new,
                            quantization=quantization)
        engine = ContinuousEngine(settings)
        engine.keep_checkpoint_weights = True
        return engine, None
    from gpu_smoke import make_processor
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    cfg = MllamaConfig()
    cfg.vision_config.image_size = 560
    cfg.image_token_index = 128256
    with torch.device("cuda"):
        model = MllamaForConditionalGeneration._from_config(cfg, dtype=torch.bfloat16)
    model.eval()
    for layer in model.model.language_model.layers:  # random init leaves the gates at 0: the image would not count
        if hasattr(layer, "cross_attn_attn_gate"):
            layer.cross_attn_attn_gate.data.fill_(0.5)
            layer.cross_attn_mlp_gate.data.fill_(0.5)
    processor, _ = make_processor()
    settings = Settings(model="in-memory-11b", device="cuda", max_batch_size=slots, gen_max_new_tokens=max_new,
                        engine_compile=compile_, quantization=quantization)
    engine = ContinuousEngine(settings)
    engine.keep_checkpoint_weights = True  # fp8: the logit check compares against transformers on these weights
    hf = engine.hf

    def load() -> None:  # the checkpoint lives in memory: skip from_pretrained, keep everything else
        from llamactl.server.hf_engine import _eos_ids

        torch.backends.cuda.enable_cudnn_sdp(False)
        hf.model, hf.processor, hf.device, hf.dtype = model, processor, "cuda", torch.bfloat16
        tok = processor.tokenizer
        hf._pad_id = int(tok.pad_token_id)
        hf._eos_ids = _eos_ids(model, tok)

    hf.load = load  # type: ignore[method-assign]
    return engine, model


def images(n: int, side: int, seed: int) -> list[Any]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)) for _ in range(n)]


def logits_check(engine: Any, model: Any, side: int, steps: int) -> list[dict[str, Any]]:
    """Teacher-forced: same tokens into HF eager (each row alone) and the engine (rows together)."""
    from llamactl.server.engine.continuous.model import Newcomer
    from llamactl.server.engine.protocol import GenParams, GenRequest

    runner, pools = engine.runner, engine.pools
    proc = engine.hf.processor
    img_msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "w1 w2 w3 describe"}]}]
    long_msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " ".join(f"w{i}" for i in range(40))}]}]
    txt_msgs = [{"role": "user", "content": [{"type": "text", "text": "w5 w6 w7 w8"}]}]
    ims = images(4, side, 7) + [images(1, 600, 8)[0].resize((900, 300))]
    compositions = {
        "1 image row": [(img_msgs, ims[0])],
        "4 image rows, 2 prompt lengths": [(img_msgs, ims[0]), (long_msgs, ims[1]), (img_msgs, ims[2]), (long_msgs, ims[3])],
        "mixed: image, text-only, wide image (2 tiles)": [(img_msgs, ims[0]), (txt_msgs, None), (long_msgs, ims[4])],
    }
    g = torch.Generator().manual_seed(0)
    out = []
    with torch.inference_mode():
        for name, rows in compositions.items():
            reqs = [GenRequest(prompt=engine.render_prompt(m), image=im, params=GenParams(max_new_tokens=steps)) for m, im in rows]
            for r in reqs:
                engine.prepare(r)
            forced = [torch.randint(0, 128000 if not engine.settings.device == "cpu" else 500, (steps,), generator=g).tolist() for _ in reqs]
            newcomers = [Newcomer(i, r.prepared.input_ids, r.prepared.cross_mask, r.prepared.pixel_values,
                                  r.prepared.aspect_ratio_ids, r.prepared.aspect_ratio_mask) for i, r in enumerate(reqs)]
            with_image = [n for n in newcomers if n.pixel_values is not None]
            if with_image:
                runner.encode_images(with_image)
            runner.set_cross_rows(newcomers)
            eng_logits = [runner.prefill(newcomers)]
            lengths = [len(r.prepared.input_ids) for r in reqs]
            dev = pools.device
            for step in range(steps - 1):
                toks = torch.tensor([f[step] for f in forced], device=dev)
                pos = torch.tensor([ln + step for ln in lengths], device=dev)
                eng_logits.append(runner.decode(toks, pos, len(reqs), max(lengths) + step + 1))
            eng = torch.stack(eng_logits, dim=1)  # [rows, steps, vocab]
            dists, agree, total = [], 0, 0
            floor: list[tuple[float, int]] = []
            for i, r in enumerate(reqs):
                p = r.prepared
                ids = torch.tensor([p.input_ids + forced[i][: steps - 1]], device=dev)
                kw: dict[str, Any] = {}
                if p.pixel_values is not None:
                    cm = p.cross_mask
                    full = torch.cat([cm, cm[-1:].expand(steps - 1, -1)])[None, :, None, :]
                    kw = dict(pixel_values=p.pixel_values.to(dev, pools.dtype), aspect_ratio_ids=p.aspect_ratio_ids.to(dev),
                              aspect_ratio_mask=p.aspect_ratio_mask.to(dev), cross_attention_mask=full.to(dev))
                ref = model(input_ids=ids, use_cache=False, **kw).logits[0, lengths[i] - 1 :].float()
                floor.append(_hf_eager_distance(model, ids, kw, lengths[i], ref))
                e = eng[i]
                d = (torch.linalg.vector_norm(e - ref, dim=-1) / torch.linalg.vector_norm(ref, dim=-1)).tolist()
                dists += d
                agree += int((e.argmax(-1) == ref.argmax(-1)).sum())
                total += steps
            out.append({"composition": name, "rows": len(reqs), "positions": total,
                        "rel_l2_max": max(dists), "rel_l2_median": statistics.median(dists),
                        "greedy_agree": agree, "greedy_total": total,
                        "hf_eager_vs_sdpa_rel_l2_max": max(f[0] for f in floor),
                        "hf_eager_vs_sdpa_greedy_agree": sum(f[1] for f in floor)})
            print(f"logits {name}: rel L2 max {max(dists):.2e} median {statistics.median(dists):.2e}, "
                  f"greedy agree {agree}/{total}; HF eager vs HF sdpa: rel L2 max "
                  f"{max(f[0] for f in floor):.2e}, greedy agree {sum(f[1] for f in floor)}/{total}", flush=True)
    return out


def _hf_eager_distance(model: Any, ids: torch.Tensor, kw: dict[str, Any], prompt_len: int,
                       ref: torch.Tensor) -> tuple[float, int]:
    """The bf16 noise floor: transformers itself with eager attention instead of SDPA, same tokens."""
    configs = [model.config, model.config.text_config, model.config.vision_config]
    before = [c._attn_implementation for c in configs]
    try:
        for c in configs:
            c._attn_implementation = "eager"
        other = model(input_ids=ids, use_cache=False, **kw).logits[0, prompt_len - 1 :].float()
    finally:
        for c, b in zip(configs, before):
            c._attn_implementation = b
    d = (torch.linalg.vector_norm(other - ref, dim=-1) / torch.linalg.vector_norm(ref, dim=-1)).max().item()
    return d, int((other.argmax(-1) == ref.argmax(-1)).sum())


def hf_generate(model: Any, engine: Any, batch: int, side: int, new: int) -> dict[str, Any]:
    proc = engine.hf.processor
    prompt = engine.render_prompt([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "w1 w2"}]}])
    ims = images(batch, side, 3)
    inp = proc(images=[[im] for im in ims], text=[prompt] * batch, padding=True, add_special_tokens=False, return_tensors="pt").to("cuda")
    inp["pixel_values"] = inp["pixel_values"].to(torch.bfloat16)
    with torch.inference_mode():
        for run in range(2):
            torch.cuda.synchronize()
            t0 = time.monotonic()
            model.generate(**inp, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=engine.hf._pad_id)
            torch.cuda.synchronize()
            took = time.monotonic() - t0
    return {"batch": batch, "tokens": batch * new, "seconds": round(took, 3), "tok_s": round(batch * new / took, 1)}


def load_level(engine: Any, concurrency: int, requests: int, side: int, new: int, seed: int,
               prepare_at_arrival: bool = False) -> dict[str, Any]:
    """Closed loop: ``concurrency`` clients, ``requests`` in all. Prompts and images are prepared before the level,
    or (``prepare_at_arrival``) each in a thread of its own when sent, as the server does, so TTFT includes it."""
    from llamactl.server.engine.protocol import GenParams, GenRequest

    prompt = engine.render_prompt([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "w1 w2 describe"}]}])
    ims = images(min(requests, 64), side, seed)
    reqs = [GenRequest(prompt=prompt, image=ims[i % len(ims)], params=GenParams(max_new_tokens=new, min_new_tokens=new))
            for i in range(requests)]
    if not prepare_at_arrival:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(engine.prepare, reqs))
    lock = threading.Lock()
    done = threading.Event()
    records: list[dict[str, Any]] = []
    nxt = [0]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    def launch() -> None:
        with lock:
            if nxt[0] >= len(reqs):
                return
            r = reqs[nxt[0]]
            nxt[0] += 1
        times: list[float] = []
        r.on_text = lambda piece, t=times: t.append(time.monotonic())
        r.on_finish = lambda res, r=r, t=times: finish(r, res, t)
        r.enqueued_at = time.monotonic()
        if prepare_at_arrival:
            threading.Thread(target=lambda: (engine.prepare(r), engine.add(r))).start()
        else:
            engine.add(r)

    def finish(r: Any, res: Any, times: list[float]) -> None:
        with lock:
            records.append({"start": r.enqueued_at, "res": res, "times": times})
            if len(records) == len(reqs):
                done.set()
        launch()

    t0 = time.monotonic()
    for _ in range(concurrency):
        launch()
    done.wait(600)
    wall = time.monotonic() - t0
    ok = [x for x in records if not isinstance(x["res"], BaseException)]
    tokens = sum(x["res"].completion_tokens for x in ok)
    ttft = [x["res"].first_token_at - x["start"] for x in ok if x["res"].first_token_at]
    itl = [b - a for x in ok for a, b in zip(x["times"], x["times"][1:])]
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {
        "concurrency": concurrency, "requests": len(reqs), "failed": len(records) - len(ok), "seconds": round(wall, 2),
        "tok_s": round(tokens / wall, 1), "req_s": round(len(ok) / wall, 3),
        "ttft_p50": pct(ttft, 0.5), "ttft_p95": pct(ttft, 0.95), "itl_p50": pct(itl, 0.5), "itl_p95": pct(itl, 0.95),
        "peak_gib": None if peak is None else round(peak, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--levels", default="1,8,32,64")
    ap.add_argument("--requests", default="8,32,96,128")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--side", type=int, default=1120)
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--probe", action="store_true", help="engine_probe.py's measurements on this engine first")
    ap.add_argument("--compile", default="off", choices=["off", "vision", "all"], help="engine_compile")
    ap.add_argument("--quantization", default="none", choices=["none", "fp8"],
                    help="fp8: the engine's FP8 text layers, their logits against transformers' bf16 forward")
    args = ap.parse_args()
    report: dict[str, Any] = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                              "torch": torch.__version__}
    import transformers

    report["transformers"] = transformers.__version__
    t0 = time.monotonic()
    engine, model = build(args.tiny, args.slots, 2048, compile_=args.compile, quantization=args.quantization)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not args.tiny and not args.skip_hf:  # before the engine's pools take the memory HF generate needs
        engine.hf.load()
        report["hf_generate"] = [hf_generate(model, engine, b, args.side, args.new) for b in (1, 32)]
        print("hf generate", report["hf_generate"], flush=True)
        torch.cuda.empty_cache()
    t0 = time.monotonic()
    engine.start()
    model = engine.hf.model
    report["start_s"] = round(time.monotonic() - t0, 1)
    report["engine"] = engine.describe()
    print("engine", report["engine"], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def dump() -> None:
        args.out.write_text(json.dumps(report, indent=1, default=str))

    if args.probe:
        from engine_probe import probe

        report["probe"] = probe(engine, model)
        dump()
    report["logits"] = logits_check(engine, model, args.side, 16)
    dump()
    if args.quantization == "fp8":  # again against transformers on the FP8 copies' own values: the kernel's part
        from llamactl.server.engine.continuous.fp8 import dequantize_in_place

        dequantize_in_place(model)
        report["logits_vs_dequantized"] = logits_check(engine, model, args.side, 16)
        dump()
    thread = threading.Thread(target=engine.run_forever, daemon=True)
    thread.start()
    report["levels"] = []
    for c, n in zip([int(x) for x in args.levels.split(",")], [int(x) for x in args.requests.split(",")]):
        load_level(engine, c, min(c, n), args.side, args.new, 100 + c)  # warm: captures this level's graphs
        lvl = load_level(engine, c, n, args.side, args.new, 200 + c)
        report["levels"].append(lvl)
        print("level", lvl, flush=True)
        dump()
    report["engine_after"] = engine.describe()
    dump()
    engine.stop()
    print(json.dumps(report["levels"], indent=1))


if __name__ == "__main__":
    main()
