"""Where the continuous engine's GPU time goes: the vision tower per SDPA backend, and graph-replayed decode steps.

    python3 bench/engine_probe.py --out $OUT/engine_probe.json      # GPU only
"""

from __future__ import annotations

import argparse
import json
import sys
import time
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
    engine.start()
    report: dict[str, Any] = {"device": torch.cuda.get_device_name()}
    vision = model.model.vision_model
    n = 8
    pixel = torch.randn(n, 1, 4, 3, 560, 560, device="cuda", dtype=torch.bfloat16)
    ar_ids = torch.ones(n, 1, dtype=torch.long, device="cuda")
    ar_mask = torch.ones(n, 1, 4, dtype=torch.long, device="cuda")
    run = lambda: vision(pixel_values=pixel, aspect_ratio_ids=ar_ids, aspect_ratio_mask=ar_mask)  # noqa: E731
    with torch.inference_mode():
        report["vision_8_images_default_s"] = timed(run)
        print("vision default", report["vision_8_images_default_s"], flush=True)
        torch.backends.cuda.enable_cudnn_sdp(True)
        t0 = time.monotonic()
        run()
        torch.cuda.synchronize()
        report["vision_cudnn_first_call_s"] = time.monotonic() - t0
        report["vision_8_images_cudnn_s"] = timed(run)
        print("vision cudnn", report["vision_cudnn_first_call_s"], report["vision_8_images_cudnn_s"], flush=True)
        torch.backends.cuda.enable_cudnn_sdp(False)
        ref = run().last_hidden_state.float()
        torch.backends.cuda.enable_cudnn_sdp(True)
        got = run().last_hidden_state.float()
        report["vision_cudnn_rel_l2"] = float(torch.linalg.vector_norm(got - ref) / torch.linalg.vector_norm(ref))
        torch.backends.cuda.enable_cudnn_sdp(False)
        for b in (1, 8, 32, 64):
            for lb in (256,):
                g = engine.graphs
                report[f"decode_replay_b{b}_l{lb}_s"] = timed(lambda: g.run(b, lb), reps=10)
                print("decode", b, lb, report[f"decode_replay_b{b}_l{lb}_s"], flush=True)
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
    args.out.write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
