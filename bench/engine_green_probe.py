"""Does an SM-partitioned stream (CUDA green context) let the vision tower run beside the decode steps?

On a started engine (11B shape, random bf16): the tower on 8 four-tile images and N graph-replayed decode steps,
each alone and then together, with the tower on (a) the engine's ordinary low-priority stream and (b) a green
context stream of S SMs for several S. Then where the time goes now (kernel tables of one batch-1 and one
batch-32 eager step and of the tower) and what FP8 GEMMs would give on this GPU's shapes.

    python3 bench/engine_green_probe.py --out $OUT/engine_green_probe.json      # GPU only
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch


def ms(start: Any, end: Any) -> float:
    return round(start.elapsed_time(end), 2)


def timed(fn: Any, stream: Any, reps: int = 3) -> float:
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            a.record()
            fn()
            b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b))
    return round(sorted(out)[len(out) // 2], 2)


def together(tower: Any, tower_stream: Any, steps: Any, main: Any) -> dict[str, float]:
    """Both queued from one start event: tower first on its stream, then the steps on the main stream."""
    start = torch.cuda.Event(enable_timing=True)
    t_end, d_end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(main):
        start.record()
    tower_stream.wait_event(start)
    with torch.cuda.stream(tower_stream):
        tower()
        t_end.record()
    with torch.cuda.stream(main):
        steps()
        d_end.record()
    torch.cuda.synchronize()
    return {"tower_ms": ms(start, t_end), "decode_ms": ms(start, d_end), "wall_ms": max(ms(start, t_end), ms(start, d_end))}


def kernel_table(fn: Any, rows: int = 20) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.self_device_time_total for e in events)
    cats: dict[str, float] = {}
    for e in events:
        n = e.key.lower()
        cat = ("gemm" if any(k in n for k in ("gemm", "nvjet", "cutlass", "sm90_xmma", "splitk", "cublas"))
               else "attention" if any(k in n for k in ("flash", "fmha", "attention", "cudnn", "sdpa"))
               else "elementwise/other")
        cats[cat] = cats.get(cat, 0.0) + e.self_device_time_total
    top = sorted(events, key=lambda e: -e.self_device_time_total)[:rows]
    return {
        "kernels": sum(e.count for e in events),
        "gpu_ms": round(total / 1000, 3),
        "by_category_ms": {k: round(v / 1000, 3) for k, v in cats.items()},
        "top": [[e.key[:90], e.count, round(e.self_device_time_total / 1000, 3)] for e in top],
    }


def fp8_gemms() -> dict[str, Any]:
    """bf16 F.linear vs torch._scaled_mm (e4m3, row-wise scales) on the decode and tower shapes."""
    out: dict[str, Any] = {}
    shapes = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096),
              "vision_fc1": (1280, 5120), "vision_qkv": (1280, 3840)}
    main = torch.cuda.current_stream()
    for name, (k, n) in shapes.items():
        ms_ = (1, 8, 32, 64) if not name.startswith("vision") else (8 * 6432,)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        w8 = w.to(torch.float8_e4m3fn)
        sw = torch.ones(1, n, device="cuda", dtype=torch.float32)
        for m in ms_:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            x8 = x.to(torch.float8_e4m3fn)
            sx = torch.ones(m, 1, device="cuda", dtype=torch.float32)
            bf = timed(lambda x=x, w=w: [torch.nn.functional.linear(x, w) for _ in range(20)], main) / 20
            try:
                f8 = timed(lambda x8=x8, w8=w8, sx=sx, sw=sw: [
                    torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16) for _ in range(20)
                ], main) / 20
            except RuntimeError as exc:
                f8 = str(exc)[:120]
            out[f"{name}_m{m}"] = {"bf16_ms": round(bf, 4), "fp8_ms": f8 if isinstance(f8, str) else round(f8, 4),
                                   "bf16_TBps": round(2 * n * k / (bf / 1000) / 1e12, 2)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sms", default="48,66,84,100,116")
    args = ap.parse_args()
    from engine_direct import build

    from llamactl.server.engine.continuous.green import sm_stream

    report: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}

    def dump() -> None:
        args.out.write_text(json.dumps(report, indent=1, default=str))

    engine, _model = build(False, 64, 2048)
    engine.start()
    report["engine"] = engine.describe()
    g, main_s, vision_s = engine.graphs, engine._main_stream, engine._lane.stream
    encoder = engine.runner.encoder
    n = 8
    pixel = torch.randn(n, 1, 4, 3, 560, 560, device="cuda", dtype=torch.bfloat16)
    ar_ids = torch.ones(n, 1, dtype=torch.long, device="cuda")
    ar_cpu = torch.ones(n, 1, 4, dtype=torch.long)
    ar_mask = ar_cpu.to("cuda")
    tower = lambda: encoder(pixel, ar_ids, ar_mask, ar_cpu)
    with torch.inference_mode():
        report["tower_8_ordinary_ms"] = timed(tower, vision_s)
        steps = {}
        for b, count in ((1, 40), (8, 40), (32, 30), (64, 24)):
            steps[b] = (lambda b=b, count=count: [g.run(b, 256) for _ in range(count)], count)
            report[f"decode_b{b}_step_ms"] = round(timed(steps[b][0], main_s) / count, 3)
        print({k: v for k, v in report.items() if k != "engine"}, flush=True)
        for b in (8, 32):
            together(tower, vision_s, steps[b][0], main_s)
            report[f"together_ordinary_b{b}"] = together(tower, vision_s, steps[b][0], main_s)
            report[f"together_ordinary_b{b}"]["decode_alone_ms"] = timed(steps[b][0], main_s)
            print(b, report[f"together_ordinary_b{b}"], flush=True)
        dump()
        for sms in [int(s) for s in args.sms.split(",")]:
            key = f"green_{sms}"
            try:
                part = sm_stream(sms, priority=0)
                entry: dict[str, Any] = {"sms": part.sms, "total_sms": part.total_sms}
                entry["tower_alone_ms"] = timed(tower, part.stream)
                for b in (8, 32):
                    together(tower, part.stream, steps[b][0], main_s)
                    entry[f"together_b{b}"] = together(tower, part.stream, steps[b][0], main_s)
                report[key] = entry
            except Exception as exc:  # noqa: BLE001 - a probe: record and go on
                report[key] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-1500:]}
            print(key, report[key], flush=True)
            dump()
        runner = engine.runner
        for b in (1, 32):
            toks = torch.zeros(b, dtype=torch.long, device="cuda")
            pos = torch.zeros(b, dtype=torch.long, device="cuda")
            try:
                report[f"profile_decode_b{b}"] = kernel_table(
                    lambda toks=toks, pos=pos, b=b: runner.decode(toks, pos, b, 256))
            except Exception as exc:  # noqa: BLE001
                report[f"profile_decode_b{b}"] = str(exc)
            print(b, json.dumps(report[f"profile_decode_b{b}"], indent=0)[:3000], flush=True)
        with torch.cuda.stream(vision_s):
            report["profile_tower_8"] = kernel_table(tower)
        print(json.dumps(report["profile_tower_8"], indent=0)[:3000], flush=True)
        dump()
        try:
            report["fp8_gemms"] = fp8_gemms()
        except Exception as exc:  # noqa: BLE001
            report["fp8_gemms"] = str(exc)
        print(json.dumps(report["fp8_gemms"], indent=0), flush=True)
    dump()


if __name__ == "__main__":
    main()
