"""Where the continuous engine's GPU time goes: the vision tower (cuDNN attention), graph-replayed decode steps,
both at once on the engine's two streams, and the kernels of one decode step at batch 1 and 32 and of the tower,
summed by kind (GEMMs, attention, the engine's Triton kernels, element-wise and the rest).

    python3 bench/engine_probe.py --out $OUT/engine_probe.json      # GPU only
    python3 bench/engine_probe.py --quick --out ...                 # without the dense-mask and overlap parts
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch


def timed(fn: Any, reps: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true", help="skip transformers' dense-mask tower and the overlap")
    args = ap.parse_args()
    from engine_direct import build

    engine, model = build(False, 64, 2048)
    engine.start()  # turns cuDNN attention on for the vision tower (the engine's default on CUDA)
    args.out.write_text(json.dumps(probe(engine, model, args.quick), indent=1, default=str))


def kind(name: str) -> str:
    """A CUDA kernel's kind, from its name."""
    low = name.lower()
    if "_self_kernel" in low or "_cross_partial" in low or "_cross_merge" in low:
        return "triton attention"
    if "_gemv_kernel" in low:
        return "triton gemv"
    if any(k in low for k in ("flash", "fmha", "cudnn", "attn", "sdpa")):
        return "attention (library)"
    if any(k in low for k in ("gemm", "cutlass", "xmma", "nvjet", "cublas", "splitk")):
        return "gemm"
    if "memcpy" in low or "memset" in low:
        return "copies"
    return "element-wise and other"


def kernel_kinds(fn: Any) -> dict[str, Any]:
    """Run ``fn`` once under the profiler: microseconds and kernel counts per kind, and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kinds: dict[str, dict[str, float]] = {}
    for e in prof.key_averages():
        if e.device_type.name != "CUDA":
            continue
        k = kinds.setdefault(kind(e.key), {"us": 0.0, "kernels": 0})
        k["us"] += e.self_device_time_total
        k["kernels"] += e.count
    return {"by_kind": {k: {"us": round(v["us"], 1), "kernels": int(v["kernels"])} for k, v in kinds.items()},
            "top": prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12)}


def probe(engine: Any, model: Any, quick: bool = False) -> dict[str, Any]:
    """The measurements, on a started engine (also run by engine_direct.py --probe, on its engine)."""
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    vision = model.model.vision_model
    n = 8
    pixel = torch.randn(n, 1, 4, 3, 560, 560, device="cuda", dtype=torch.bfloat16)
    ar_ids = torch.ones(n, 1, dtype=torch.long, device="cuda")
    ar_mask = torch.ones(n, 1, 4, dtype=torch.long, device="cuda")
    run = lambda: vision(pixel_values=pixel, aspect_ratio_ids=ar_ids, aspect_ratio_mask=ar_mask)
    g = engine.graphs
    main_s, vision_s = engine._main_stream, engine._lane.stream
    encoder = engine.runner.encoder
    ar_cpu = torch.ones(n, 1, 4, dtype=torch.long)
    split = lambda: encoder(pixel, ar_ids, ar_mask, ar_cpu)
    with torch.inference_mode():
        described = engine.describe()
        report["engine"] = {k: described.get(k) for k in ("vision_attention", "cross_attention", "self_attention",
                                                          "one_row_projections")}
        report["vision_8_images_split_mask_s"] = timed(split)
        report["vision_8_images_cudnn_s"] = report["vision_8_images_split_mask_s"]  # what the engine runs
        if not quick:
            report["vision_8_images_dense_mask_s"] = timed(run)  # transformers' path (cuDNN attention, dense mask)
            dense = model.model.multi_modal_projector(run().last_hidden_state).reshape(n, -1, 4096).float()
            got = split().float()
            report["vision_split_vs_dense_rel_l2"] = float(torch.linalg.vector_norm(got - dense)
                                                           / torch.linalg.vector_norm(dense))
        print("vision 8 images", {k: v for k, v in report.items() if k.startswith("vision")}, flush=True)
        run = split
        for b in (1, 8, 32, 64):
            for lb in (256,):
                report[f"decode_replay_b{b}_l{lb}_s"] = timed(lambda b=b, lb=lb: g.run(b, lb), reps=10)
                print("decode", b, lb, report[f"decode_replay_b{b}_l{lb}_s"], flush=True)
        # Vision on the low-priority stream while the high-priority stream replays decode steps (the engine's
        # overlap): each alone, then together from one start event.
        steps = 30
        for b in () if quick else (8, 32):
            from engine_green_probe import together

            def pair(b: int = b) -> dict[str, float]:
                ms = together(run, vision_s, lambda: [g.run(b, 256) for _ in range(steps)], main_s)
                return {"decode_s": ms["decode_ms"] / 1000, "vision_s": ms["tower_ms"] / 1000}
            pair()
            both = pair()
            with torch.cuda.stream(main_s):
                alone = timed(lambda b=b: [g.run(b, 256) for _ in range(steps)], reps=3)
            report[f"overlap_b{b}"] = {
                "decode_steps": steps, "decode_alone_s": alone, "vision_alone_s": report["vision_8_images_cudnn_s"],
                "together_decode_s": both["decode_s"], "together_vision_s": both["vision_s"],
                "together_wall_s": max(both.values()),
                "serial_s": alone + report["vision_8_images_cudnn_s"],
            }
            print("overlap", b, report[f"overlap_b{b}"], flush=True)
        # where the time goes: one eager decode step at batch 1 and 32 (the forms the graphs capture) and the tower
        for b in (1, 32):
            toks = torch.zeros(b, dtype=torch.long, device="cuda")
            pos = torch.full((b,), 200, dtype=torch.long, device="cuda")
            report[f"decode_b{b}_kernels"] = kernel_kinds(lambda b=b, toks=toks, pos=pos:
                                                          engine.runner.decode(toks, pos, b, 256))
            print(f"decode b={b}", json.dumps(report[f"decode_b{b}_kernels"]["by_kind"]), flush=True)
            print(report[f"decode_b{b}_kernels"]["top"], flush=True)
        report["vision_8_images_kernels"] = kernel_kinds(split)
        print("vision 8 images", json.dumps(report["vision_8_images_kernels"]["by_kind"]), flush=True)
        print(report["vision_8_images_kernels"]["top"], flush=True)
    return report


if __name__ == "__main__":
    main()
