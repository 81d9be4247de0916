"""Where the continuous engine's GPU time goes: the vision tower (cuDNN attention), graph-replayed decode steps,
both at once on the engine's two streams, and the kernels of one batch-1 step.

    python3 bench/engine_probe.py --out $OUT/engine_probe.json      # GPU only
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
    args = ap.parse_args()
    from engine_direct import build

    engine, model = build(False, 64, 2048)
    engine.start()  # turns cuDNN attention on for the vision tower (the engine's default on CUDA)
    args.out.write_text(json.dumps(probe(engine, model), indent=1, default=str))


def probe(engine: Any, model: Any) -> dict[str, Any]:
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
        report["engine_vision_attention"] = engine.describe().get("vision_attention")
        report["vision_8_images_dense_mask_s"] = timed(run)  # transformers' path (cuDNN attention, dense mask)
        report["vision_8_images_split_mask_s"] = timed(split)
        report["vision_8_images_cudnn_s"] = report["vision_8_images_split_mask_s"]  # what the engine runs
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
        for b in (8, 32):
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
        # where a replay's time goes: profile one b=1 eager step
        from torch.profiler import ProfilerActivity, profile

        toks = torch.zeros(1, dtype=torch.long, device="cuda")
        pos = torch.zeros(1, dtype=torch.long, device="cuda")
        engine.runner.decode(toks, pos, 1, 256)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            engine.runner.decode(toks, pos, 1, 256)
            torch.cuda.synchronize()
        events = prof.key_averages()
        report["decode_b1_kernels"] = sum(e.count for e in events if e.device_type.name == "CUDA")
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15)
        report["decode_b1_profile"] = table
        print(table, flush=True)
    return report


if __name__ == "__main__":
    main()
